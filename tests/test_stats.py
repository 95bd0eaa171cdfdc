"""Bootstrap intervals, paired p-values and Holm's correction (bench/analysis/stats.py) against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from bench.analysis.stats import Draws, Scores, holm, interval, paired_p, replicates


def test_holm_by_hand():
    # sorted p: 0.01, 0.02, 0.04 -> 3·0.01, max(0.03, 2·0.02), max(0.04, 1·0.04)
    assert holm({"a": 0.04, "b": 0.01, "c": 0.02}) == pytest.approx({"b": 0.03, "c": 0.04, "a": 0.04})
    assert holm({"a": 0.5, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1


def test_replicates_follow_the_drawn_examples_and_seeds():
    """One replicate written out: examples drawn per subtask, seed positions from the uniform numbers."""
    rng = np.random.default_rng(0)
    values = [[rng.random(4), rng.random(3)] for _ in range(3)]  # 3 seeds, subtasks of 4 and 3 examples
    scores = Scores(["a", "b"], values)
    draws = Draws.make({"a": 4, "b": 3}, 3, 5, seed=1)
    got = replicates(scores, draws)
    for r in range(5):
        seeds = [min(int(u * 3), 2) for u in draws.seeds[r, :3]]
        expected = np.mean([np.mean([values[s][0][draws.examples["a"][r]].mean(),
                                     values[s][1][draws.examples["b"][r]].mean()]) for s in seeds])
        assert got[r] == pytest.approx(expected)
    assert scores.statistic() == pytest.approx(np.mean([np.mean([v.mean() for v in seed]) for seed in values]))


def test_intervals_cover_the_true_accuracy_about_95_percent_of_the_time():
    """200 simulated evaluations of a method with accuracy 0.3 on 2 subtasks × 100 examples, 3 seeds."""
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        values = [[(rng.random(100) < 0.3).astype(float) for _ in range(2)] for _ in range(3)]
        draws = Draws.make({"a": 100, "b": 100}, 3, 400, seed=trial)
        low, high = interval(replicates(Scores(["a", "b"], values), draws))
        covered += low <= 0.3 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_p_values():
    rng = np.random.default_rng(3)
    a = rng.normal(size=999)
    assert paired_p(a, a) == 1.0  # no difference at all
    assert paired_p(a + 10, a) == pytest.approx(2 / 1000)  # every replicate on one side: the smallest p
    assert paired_p(a, a + 10) == pytest.approx(2 / 1000)
    shifted = paired_p(a + 0.01, a)  # a small shift, paired: still every replicate on one side
    assert shifted == pytest.approx(2 / 1000)
    b = rng.normal(size=999)
    assert paired_p(a, b) > 0.05  # two independent noises centred on 0
