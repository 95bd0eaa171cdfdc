"""Uncertainty and paired comparisons of leaderboard rows: a bootstrap over examples and seeds, Holm's correction.

A *setting* is everything that fixes what is measured except the method (task and its config, model, expert
pool, number of fit examples, profile); every method of a setting is scored on the same eval examples. A row's
data are its per-seed, per-subtask score vectors over those examples (``Scores``). Its statistic is the macro
average: the mean over seeds of the mean over subtasks of the mean over examples.

The bootstrap draws, per replicate, examples with replacement within each subtask (the same draws for every
method of the setting: paired) and seeds with replacement (seed positions drawn by the same uniform numbers for
every method, so seed i meets seed i where methods share seeds), and recomputes the statistic. The 95 % interval
is the 2.5th and 97.5th percentiles; a paired difference's two-sided p-value is
``(1 + #{replicates on the far side of 0}) · 2 / (B + 1)`` (capped at 1); Holm's step-down adjusts the p-values of
one family of comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
ALPHA = 0.05  # a paired difference is significant when its Holm-corrected p-value is below this


@dataclass
class Scores:
    """One row's data: ``values[s][t]`` the per-example scores of seed s on subtask t (examples in the
    setting's order, every seed and method the same examples)."""

    subtasks: list[str]
    values: list[list[np.ndarray]]

    def statistic(self, subtasks: list[str] | None = None) -> float:
        """The macro average (module docstring); over `subtasks` only when given."""
        chosen = [self.subtasks.index(t) for t in subtasks] if subtasks else range(len(self.subtasks))
        return float(np.mean([np.mean([seed[i].mean() for i in chosen]) for seed in self.values]))


@dataclass
class Draws:
    """One setting's bootstrap draws: per subtask an index matrix (B, n_t), and uniform numbers for seeds (B, S)."""

    examples: dict[str, np.ndarray]
    seeds: np.ndarray

    @classmethod
    def make(cls, sizes: dict[str, int], max_seeds: int, replicates: int, seed: int) -> "Draws":
        rng = np.random.default_rng(seed)
        examples = {t: rng.integers(0, n, size=(replicates, n)) for t, n in sorted(sizes.items())}
        return cls(examples, rng.random((replicates, max_seeds)))


def replicates(scores: Scores, draws: Draws, subtasks: list[str] | None = None) -> np.ndarray:
    """The statistic under every bootstrap replicate, (B,); over `subtasks` only when given."""
    chosen = subtasks or scores.subtasks
    n_seeds = len(scores.values)
    # per seed: (B,) macro mean over the chosen subtasks of the resampled example means
    per_seed = np.stack([
        np.mean([scores.values[s][scores.subtasks.index(t)][draws.examples[t]].mean(1) for t in chosen], axis=0)
        for s in range(n_seeds)
    ], axis=1)  # (B, S)
    picks = np.minimum((draws.seeds[:, :n_seeds] * n_seeds).astype(int), n_seeds - 1)  # (B, S) seed positions
    return np.take_along_axis(per_seed, picks, axis=1).mean(1)


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided bootstrap p-value of ``mean(a) - mean(b) = 0`` from paired replicates."""
    diff = a - b
    far = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
    return float(min(1.0, 2 * (1 + far) / (len(diff) + 1)))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values of one family (monotone, capped at 1)."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out
