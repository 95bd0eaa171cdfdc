"""The method contract (DESIGN §3).

A method turns (base model, expert pool, fit examples) into one or more `Composed` models that a task
scores. `compose` is a generator: it yields each composed variant with its adapters or gates in place and
undoes its changes to the base model when the generator resumes, so the runner never needs to know how a
method modifies the model.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from bench.lora.adapters import LoraAdapter
from bench.lora.pool import ExpertPool
from tasks.base import Example


@dataclass
class FitReport:
    """What a method used to build a composed model: the fairness ledger of DESIGN §3."""

    examples: int = 0
    steps: int = 0
    seconds: float = 0.0
    trained_params: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # method specifics: weights found, chosen expert, ...


@dataclass
class Composed:
    """What a task evaluates. NLP: `generate(prompts)`; static methods also carry the merged adapter."""

    model: Any  # bench.models.lm.LanguageModel for NLP
    report: FitReport
    variant: str = ""
    adapter: LoraAdapter | None = None
    hooks: Any = None  # NLP: the `bench.models.generation.RowHooks` with the method's per-row state, if it has any

    def generate(self, prompts: list[str], **kwargs) -> list[str]:
        return self.model.generate(prompts, **kwargs) if self.hooks is None else \
            self.model.generate(prompts, hooks=self.hooks, **kwargs)

    def save(self, folder: str | Path) -> Path | None:
        """Persist what was composed (a peft folder for static methods); None when there is nothing to save."""
        return self.adapter.save(folder) if self.adapter is not None else None


@dataclass
class FitContext:
    """Everything a method may use. Methods never see the eval set or the task object."""

    model: Any  # bench.models.lm.LanguageModel for NLP
    pool: ExpertPool
    fit_examples: list[Example]
    seed: int
    prompt: Callable[[Example], str]  # the task's prompt for an example (what the model reads)
    score: Callable[[Composed, list[Example]], float]  # the task's metric on given examples (fit examples only)
    unit: str = "all"  # the subtask(s) this fit is for


class Method(ABC):
    """Base class; subclasses set `domains` and implement `compose`."""

    registry_name: str = ""
    domains: tuple[str, ...] = ("nlp",)

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.check_config()

    def check_config(self) -> None:
        """Raise `ConfigError` for invalid hyperparameters (called at construction, before any work)."""

    def uses_seed(self) -> bool:
        """Whether the run seed can change this method's result (fit examples, sampling, random masks).
        A method that returns False is one job for every seed: its key leaves the seed out, so a sweep over
        seeds runs it once (task evaluation never depends on the run seed)."""
        return True

    def params(self) -> dict:
        """Hyperparameters recorded with every result."""
        return OmegaConf.to_container(self.cfg, resolve=True) if self.cfg is not None else {}

    @abstractmethod
    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        """Yield composed models; code after each `yield` restores the base model."""


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
