"""`task=bbh_cross`: LoraHub's cross-task protocol on BIG-Bench Hard.

Every one of the 27 subtasks is scored zero-shot on all its eval examples, each with a composition fitted on
its own K fit examples, from experts that never saw its task: the subtasks are grouped into *folds* by family
(``folds``: the three logical_deduction tasks together, the three tracking_shuffled_objects tasks together;
every other subtask is its own fold), and a subtask's unit may compose only the experts whose training task is
outside its fold: BBH experts of other folds, the Flan CoT experts, and the algorithmic experts whose BBH twin
(`tasks.algorithmic.BBH_TWINS`) is outside the fold. From those, ``n_experts`` (LoraHub's N = 20) are drawn per
fold and seed; every method of a seed composes the same experts. What an expert was trained on is read from
its metadata (``bench_metadata.json``: task and subtask); an adapter without it is taken as trained on none of
BBH's tasks. Each unit's experts are recorded in the job's ``task_info``.
"""

from __future__ import annotations

import random

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter
from bench.lora.pool import ExpertPool
from bench.registry import register_task
from tasks.algorithmic import BBH_TWINS
from tasks.bbh import SUBTASKS, BBHTask

BBH_TASKS = ("bbh", "bbh_cross")  # tasks whose experts are trained on a BBH subtask itself


def trained_on(adapter: LoraAdapter) -> str | None:
    """The BBH subtask an expert was trained on, or on an algorithmic twin of (None: neither, or unknown)."""
    meta = adapter.metadata or {}
    task, subtask = meta.get("task"), meta.get("subtask")
    if task in BBH_TASKS:
        return subtask
    if task == "algorithmic":
        return BBH_TWINS.get(subtask)
    return None


@register_task("bbh_cross")
class BBHCrossTask(BBHTask):
    def __init__(self, cfg, data_root=None) -> None:
        super().__init__(cfg, data_root)
        if cfg.get("fit_scope", "per_subtask") != "per_subtask":
            raise ConfigError("task=bbh_cross fits one composition per subtask (each from its fold's experts); "
                              f"task.fit_scope={cfg.fit_scope!r} is not allowed")
        n = cfg.get("n_experts")
        if n is not None and int(n) < 1:
            raise ConfigError(f"task.n_experts={n}: must be a positive number of experts, or null for all")
        self.fold_of = folds(cfg.get("folds") or {})
        self.picked: dict[str, list[str]] = {}

    def samples_experts(self) -> bool:
        return self.cfg.get("n_experts") is not None

    def unit_pool(self, unit: list[str], pool: ExpertPool, seed: int) -> ExpertPool:
        """The experts of `unit`'s fold (trained outside it), ``n_experts`` of them drawn with the seed and the
        fold's name, kept in pool order."""
        fold = {self.fold_of[s] for s in unit}
        if len(fold) != 1:
            raise ConfigError(f"task=bbh_cross: unit {unit} spans folds {sorted(fold)}")
        name = fold.pop()
        members = {s for s, f in self.fold_of.items() if f == name}
        eligible = [a.name for a in pool if trained_on(a) not in members]
        if not eligible:
            raise ConfigError(f"task=bbh_cross: no expert of pool {pool.names} was trained outside fold {name!r}")
        n = self.cfg.get("n_experts")
        if n is not None and int(n) < len(eligible):
            chosen = set(random.Random(f"{seed}:{name}").sample(eligible, int(n)))
            eligible = [e for e in eligible if e in chosen]
        self.picked["+".join(unit)] = eligible
        return pool.subset(eligible)

    def record_info(self) -> dict:
        return {"folds": {s: self.fold_of[s] for s in self.subtasks()}, "unit_experts": dict(self.picked)}


def folds(groups: dict) -> dict[str, str]:
    """Subtask -> fold name: the configured groups (fold name -> subtasks), every other subtask its own fold."""
    fold_of = {s: s for s in SUBTASKS}
    seen: dict[str, str] = {}
    for name, members in groups.items():
        for subtask in members:
            if subtask not in SUBTASKS:
                raise ConfigError(f"task.folds.{name}: unknown BBH subtask {subtask!r}")
            if subtask in seen:
                raise ConfigError(f"task.folds: {subtask!r} is in two folds ({seen[subtask]!r} and {name!r})")
            seen[subtask] = str(name)
            fold_of[subtask] = str(name)
    return fold_of
