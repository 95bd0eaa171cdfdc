"""The task contract (DESIGN §3) and the shared machinery of generative NLP tasks.

Each subtask's examples are split once, deterministically, into a *fit pool* (the examples that trainable
methods and few-shot prompts may see) and an *eval set* (scored); the split orders examples by a hash of
their input, so it does not depend on file order and never changes with the seed. `fit_examples(k, seed)`
samples from the fit pool only.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from bench.errors import ConfigError
from tasks.metrics import exact_match, extract_answer

if TYPE_CHECKING:
    from bench.lora.pool import ExpertPool
    from methods.base import Composed


@dataclass(frozen=True)
class Example:
    input: str
    target: str  # the answer that is scored
    subtask: str
    completion: str | None = None  # teacher-forcing text when it differs from target (a rationale)

    @property
    def train_target(self) -> str:
        return self.completion if self.completion is not None else self.target


@dataclass(frozen=True)
class Score:
    subtask: str
    metric: str
    value: float
    n: int


def stable_order(examples: list[Example]) -> list[Example]:
    """Examples sorted by a hash of their input: a fixed pseudo-random order independent of file order."""
    return sorted(examples, key=lambda e: hashlib.sha1(f"{e.subtask}\x00{e.input}".encode()).hexdigest())


class Task(ABC):
    registry_name: str = ""
    domain: str = "nlp"

    def __init__(self, cfg: DictConfig, data_root: str | None = None) -> None:
        self.cfg = cfg
        self.data_root = data_root
        limit = cfg.get("limit")
        if limit is not None and int(limit) < 1:
            raise ConfigError(f"task.limit={limit}: must be a positive number of examples, or null for all")
        if cfg.get("fit_scope", "per_subtask") not in ("per_subtask", "joint"):
            raise ConfigError(f"task.fit_scope={cfg.fit_scope!r}; choose per_subtask or joint")

    # --------------------------------------------------------------- subtasks and splits
    @abstractmethod
    def all_subtasks(self) -> list[str]:
        """Every subtask this task family has."""

    @abstractmethod
    def split(self, subtask: str) -> tuple[list[Example], list[Example]]:
        """(fit pool, eval set) of a subtask; disjoint and deterministic."""

    def subtasks(self) -> list[str]:
        chosen = self.cfg.get("subtasks")
        known = self.all_subtasks()
        if not chosen:
            return known
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise ConfigError(f"task {self.registry_name!r}: unknown subtasks {unknown}; known: {known}")
        return list(chosen)

    def check_data(self) -> None:
        """Raise `DataError` at once when the configured data root lacks this task's files (default: nothing to
        check; a task that reads its data lazily checks here)."""

    def data_files(self) -> list[Path]:
        """The files this task reads for its chosen subtasks (their digests are part of a job's key; default:
        none, e.g. generated data)."""
        return []

    def fit_units(self) -> list[list[str]]:
        """Groups of subtasks that share one fitted composition: each subtask alone (LoraHub's protocol), or
        all together (one composed model scored on every subtask, the MoLE in-domain setting)."""
        subtasks = self.subtasks()
        return [subtasks] if self.cfg.get("fit_scope", "per_subtask") == "joint" else [[s] for s in subtasks]

    def samples_experts(self) -> bool:
        """Whether `unit_pool` draws experts with the run seed (then every method's result depends on the seed)."""
        return False

    def unit_artifacts(self, unit: list[str], variants: list[str]) -> list[str]:
        """Files or folders (relative to the run folder) that evaluating `unit`'s composed `variants` wrote
        besides rows and predictions; a resumed job copies a carried unit's from the earlier attempt (default:
        none)."""
        return []

    def unit_pool(self, unit: list[str], pool: "ExpertPool", seed: int) -> "ExpertPool":
        """The experts a fit unit may compose (default: the whole pool)."""
        return pool

    def fit_examples(self, k: int, seed: int, subtasks: list[str]) -> list[Example]:
        """`k` examples per subtask from the fit pool, drawn with `seed` (the same for every method)."""
        out = []
        for subtask in subtasks:
            pool = self.split(subtask)[0]
            if k > len(pool):
                raise ConfigError(f"task {self.registry_name!r}/{subtask}: asked for {k} fit examples, pool has {len(pool)}")
            out.extend(random.Random(f"{seed}:{subtask}").sample(pool, k))
        return out

    def eval_examples(self, subtask: str, limit: int | None = None) -> list[Example]:
        limit = limit if limit is not None else self.cfg.get("limit")
        examples = self.split(subtask)[1]
        return examples[:limit] if limit else examples

    # --------------------------------------------------------------- prompting and scoring
    @abstractmethod
    def prompt(self, example: Example) -> str:
        """The text the model reads for `example`."""

    def train_examples(self, subtask: str, n: int, seed: int) -> list[Example]:
        """Examples to train an expert on this subtask (never eval examples)."""
        raise ConfigError(f"task {self.registry_name!r} provides no training data (it is for evaluation only)")

    @abstractmethod
    def evaluate(self, composed: "Composed", subtasks: list[str]) -> tuple[list[Score], list[dict]]:
        """Scores per subtask and metric, and one prediction row per example."""


def _names(examples: list[Example]) -> str:
    """The subtasks of `examples` for a progress bar: their names, or their count beyond two."""
    names = list(dict.fromkeys(e.subtask for e in examples))
    return "+".join(names) if len(names) <= 2 else f"{len(names)} subtasks"


class GenerativeTask(Task):
    """Greedy generation scored by exact match after answer extraction. The answer format may differ per
    subtask (a subtask trained on a step-by-step target is read after "the answer is", with a larger
    generation budget): `answer_mode(subtask)` and `max_new_tokens(subtask)`."""

    def answer_mode(self, subtask: str) -> str:
        """How the answer is read from a generation of `subtask` (see `tasks.metrics.extract_answer`)."""
        return self.cfg.get("answer_extraction", "first_line")

    def max_new_tokens(self, subtask: str) -> int:
        """The generation budget of `subtask`."""
        return int(self.cfg.max_new_tokens)

    def score_examples(self, composed: "Composed", examples: list[Example]) -> tuple[float, list[dict]]:
        """Exact match over `examples` (one or several subtasks, e.g. a joint fit set). Examples whose subtasks
        share a generation budget are generated in one call, in their given order; rows keep that order."""
        budgets = [self.max_new_tokens(e.subtask) for e in examples]
        generations: list[str | None] = [None] * len(examples)
        for budget in dict.fromkeys(budgets):  # distinct budgets, first-seen order
            idx = [i for i, b in enumerate(budgets) if b == budget]
            outputs = composed.generate(
                [self.prompt(examples[i]) for i in idx], max_new_tokens=budget, progress=True,
                desc=f"eval {self.registry_name} {_names(examples)} {composed.variant}".strip(),
            )
            for i, generation in zip(idx, outputs):
                generations[i] = generation
        rows = []
        for example, generation in zip(examples, generations):
            answer = extract_answer(generation, self.answer_mode(example.subtask))
            rows.append(
                {"subtask": example.subtask, "input": example.input, "target": example.target,
                 "generation": generation, "answer": answer, "correct": exact_match(answer, example.target)}
            )
        value = sum(r["correct"] for r in rows) / max(len(rows), 1)
        return value, rows

    def evaluate(self, composed: "Composed", subtasks: list[str]) -> tuple[list[Score], list[dict]]:
        """Every subtask's eval examples generated together (one engine call per generation budget, so batches
        fill across subtasks), then scored per subtask; prediction rows in subtask order."""
        examples = [e for subtask in subtasks for e in self.eval_examples(subtask)]
        _, rows = self.score_examples(composed, examples)
        scores = []
        for subtask in subtasks:
            own = [r for r in rows if r["subtask"] == subtask]
            scores.append(Score(subtask, "exact_match", sum(r["correct"] for r in own) / max(len(own), 1), len(own)))
        return scores, rows
