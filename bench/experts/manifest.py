"""Expert-pool manifests: what each expert of a trained pool was trained on, and whether it is current.

A trained pool lives in ``experts.dir`` as one peft folder per expert plus ``manifest.json`` (command, base-model
fingerprint, the pool's training config and data hash, and per expert: its effective training hyperparameters,
the sha256 of its own training examples, the answer format it was scored with and its score vs the base on its
own task). ``train.per_expert`` overrides ``steps, examples, lr, batch_size, max_len`` for named experts.

Staleness is per expert: an expert is current when its manifest row and adapter folder exist, its recorded
hyperparameters equal its effective config, its recorded data digest equals the digest of the examples the
current config would train it on, and its recorded answer format (answer mode, max_new_tokens of its subtask)
is the current one; a different base model (weight fingerprint) makes every expert stale. `make experts` then
trains only the stale or missing experts (`bench.experts.pools.train_pool`) and keeps the others. Manifests written
before per-expert rows existed are backfilled on load, and only when recomputing every expert's examples from
the manifest's recorded config reproduces its recorded pool data digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from bench.config import default_data_root
from bench.errors import AdapterError, ConfigError, DataError
from bench.files import exclusive, write_json_atomic
from bench.lora.adapters import WEIGHTS_SAFETENSORS
from bench.models.lm import LanguageModel
from bench.models.loading import fingerprint
from bench.registry import make_task
from tasks.base import Example, Task

MANIFEST = "manifest.json"
# keys of `train` that `train.per_expert.<subtask>` may override
PER_EXPERT_KEYS = ("steps", "examples", "lr", "batch_size", "max_len")
# an expert's hyperparameters, recorded in its manifest row (with task_cfg) and compared for staleness
HYPER_KEYS = ("task", "steps", "examples", "lr", "batch_size", "rank", "alpha", "targets", "max_len", "seed")

log = logging.getLogger(__name__)


def expert_names(cfg: DictConfig) -> list[str]:
    """The experts of a trained pool: one per subtask of ``train.subtasks``, named after it."""
    return [str(s) for s in cfg.train.subtasks]


def manifest_problem(cfg: DictConfig, base: torch.nn.Module) -> str | None:
    """Why the manifest in ``cfg.dir`` does not vouch for a pool of `base` trained with ``cfg.train`` as a whole
    (None: it does). The DreamBooth pools' check (`bench.experts.vl`); LM pools are judged per expert
    (`stale_experts`)."""
    path = Path(cfg.dir) / MANIFEST
    if not path.is_file():
        return "not trained yet (no manifest.json)"
    manifest = json.loads(path.read_text())
    if manifest.get("base_fingerprint") != fingerprint(base):
        return "trained on other base-model weights (fingerprint differs)"
    if manifest.get("train") != OmegaConf.to_container(cfg.train, resolve=True):
        return "trained with another training config"
    return None


# ----------------------------------------------------------------------------- per-expert configs and plans
def per_expert_overrides(cfg: DictConfig) -> dict[str, dict]:
    """``train.per_expert`` validated: subtask of the pool -> overrides of `PER_EXPERT_KEYS`."""
    raw = cfg.train.get("per_expert")
    per = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else (raw or {})
    if not isinstance(per, dict):
        raise ConfigError(f"experts.train.per_expert must map subtask names to overrides, got {per!r}")
    names = expert_names(cfg)
    unknown = [s for s in per if s not in names]
    if unknown:
        raise ConfigError(f"experts.train.per_expert: unknown experts {unknown}; this pool's experts: {names}")
    for name, overrides in per.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"experts.train.per_expert.{name} must be a mapping of {list(PER_EXPERT_KEYS)}, "
                              f"got {overrides!r}")
        bad = [k for k in overrides if k not in PER_EXPERT_KEYS]
        if bad:
            raise ConfigError(f"experts.train.per_expert.{name}: unknown keys {bad}; allowed: {list(PER_EXPERT_KEYS)}")
    return {str(k): dict(v) for k, v in per.items()}


def effective_train(cfg: DictConfig, name: str) -> DictConfig:
    """The training config of expert `name`: ``train`` without ``per_expert``, updated with its overrides."""
    per = per_expert_overrides(cfg)
    if name not in expert_names(cfg):
        raise ConfigError(f"expert {name!r} is not in pool {cfg.name!r} ({expert_names(cfg)})")
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.pop("per_expert", None)
    train.update(per.get(name, {}))
    return OmegaConf.create(train)


def _hyper(train: dict | DictConfig) -> dict:
    """The hyperparameters a manifest row records: `HYPER_KEYS` and task_cfg."""
    train = OmegaConf.to_container(train, resolve=True) if isinstance(train, DictConfig) else train
    return {**{k: train.get(k) for k in HYPER_KEYS}, "task_cfg": train.get("task_cfg") or {}}


def examples_sha256(examples: list[Example]) -> str:
    """The digest recipe of pools and rows: sha256 over ``input NUL train_target SOH`` of each example, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.input}\x00{e.train_target}\x01".encode())
    return digest.hexdigest()


def eval_format(task: Task, subtask: str) -> dict:
    """What a manifest row's scores depend on besides the adapter: how the answer is generated and read."""
    if hasattr(task, "answer_mode") and hasattr(task, "max_new_tokens"):
        return {"answer_mode": task.answer_mode(subtask), "max_new_tokens": task.max_new_tokens(subtask)}
    return {}


@dataclass
class ExpertPlan:
    """What the current config would train expert `name` on, and how its scores would be taken."""

    name: str
    train: DictConfig  # effective config
    examples: list[Example]
    data_sha256: str
    eval: dict
    end_token: str | None = None  # the tokenizer's EOS, appended to every training target

    def record(self) -> dict:
        record = {"train": _hyper(self.train), "data_sha256": self.data_sha256, "eval": self.eval}
        return record if self.end_token is None else {**record, "end_token": self.end_token}


def plan_pool(cfg: DictConfig, data_root: str | None, end_token: str | None = None) -> tuple[Task, list[ExpertPlan]]:
    """The task and each expert's plan (effective config, training examples, their digest, answer format, and
    `end_token`, the EOS its targets end with, when a tokenizer is at hand)."""
    per_expert_overrides(cfg)  # validate before building anything
    task = make_task(cfg.train.task, cfg.train.get("task_cfg"), data_root)
    unknown = [s for s in expert_names(cfg) if s not in task.all_subtasks()]
    if unknown:
        raise ConfigError(f"experts.train.subtasks: unknown {cfg.train.task} subtasks {unknown}; "
                          f"known: {task.all_subtasks()}")
    holdout = getattr(task, "expert_holdout", None)  # eval examples the task keeps out of expert training
    if holdout is not None and int(cfg.get("manifest_eval_limit", 20)) > holdout:
        raise ConfigError(f"experts.manifest_eval_limit={cfg.manifest_eval_limit} exceeds the {holdout} examples per "
                          f"subtask that task {cfg.train.task!r} keeps out of expert training (task_cfg.expert_holdout)")
    plans = []
    for name in expert_names(cfg):
        train = effective_train(cfg, name)
        examples = task.train_examples(name, int(train.examples), int(train.seed))
        plans.append(ExpertPlan(name, train, examples, examples_sha256(examples), eval_format(task, name), end_token))
    return task, plans


# ----------------------------------------------------------------------------- manifest and staleness
def read_manifest(cfg: DictConfig, data_root: str | None = None) -> dict | None:
    """The pool's manifest (None when absent), its rows backfilled when it predates per-expert records
    (`backfill_manifest`; in memory only, nothing is rewritten)."""
    path = Path(cfg.dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    backfill_manifest(manifest, data_root)
    return manifest


# Task keys added together with per-expert records, off in every manifest written before them.
FORMATS_BEFORE_RECORDS = {"scratchpad": [], "cot_subtasks": []}


def _has_record(row: dict) -> bool:
    return "train" in row and "data_sha256" in row


def backfill_manifest(manifest: dict, data_root: str | None) -> bool:
    """Give the rows of a manifest written before per-expert records their records (``train``, ``data_sha256``,
    ``eval``, and ``backfilled: true``), in place. Each expert's examples are recomputed with the manifest's own
    recorded ``train`` config, with the per-subtask answer formats that came with the records off
    (`FORMATS_BEFORE_RECORDS`: such pools were trained before they existed, whatever the task's defaults are now);
    the backfill is accepted only if one sha256 over all experts' examples in manifest
    order reproduces the recorded pool ``data_sha256`` (and the row counts agree). Returns whether every row has
    a record afterwards; on a mismatch, or data that cannot be read, the rows stay without (stale)."""
    rows = manifest.get("experts") or []
    if all(_has_record(r) for r in rows):
        return True
    recorded = manifest.get("train")
    if not isinstance(recorded, dict) or recorded.get("per_expert") or "data_sha256" not in manifest:
        return False
    try:
        task_cfg = {**FORMATS_BEFORE_RECORDS, **(recorded.get("task_cfg") or {})}
        task = make_task(recorded["task"], task_cfg, data_root)
        every, filled = [], []
        for row in rows:
            examples = task.train_examples(row["name"], int(recorded["examples"]), int(recorded["seed"]))
            if row.get("train_examples") not in (None, len(examples)) or row.get("steps") not in (None, recorded["steps"]):
                return False
            every.extend(examples)
            filled.append({"train": _hyper(recorded), "data_sha256": examples_sha256(examples),
                           "eval": eval_format(task, row["name"]), "backfilled": True})
    except (ConfigError, DataError, KeyError) as exc:
        log.warning("manifest of pool %s: per-expert records not backfilled (%s)", manifest.get("pool"), exc)
        return False
    if examples_sha256(every) != manifest["data_sha256"]:
        log.warning("manifest of pool %s: recomputed examples do not reproduce its data_sha256; experts are stale",
                    manifest.get("pool"))
        return False
    for row, record in zip(rows, filled):
        row.update(record)
    return True


def _adapter_saved(folder: Path, name: str) -> bool:
    """Whether the expert's peft folder holds its config and its weights (a clone without the weights of a pool
    whose weights are not committed has the config alone)."""
    expert = folder / name
    return (expert / "adapter_config.json").is_file() and (expert / WEIGHTS_SAFETENSORS).is_file()


def expert_problem(plan: ExpertPlan, row: dict | None, folder: Path) -> str | None:
    """Why expert `plan.name` must be (re)trained (None: its adapter and manifest row are current)."""
    if row is None:
        return "not trained"
    if not _adapter_saved(folder, plan.name):
        return "adapter files missing"
    if not _has_record(row):
        return "manifest row has no training record (predates per-expert records; backfill not verified)"
    current = _hyper(plan.train)
    recorded = row["train"]
    diffs = [f"{k} {recorded.get(k)!r} -> {current[k]!r}" for k in HYPER_KEYS if recorded.get(k) != current[k]]
    if diffs:
        return "trained with other hyperparameters: " + ", ".join(diffs)
    if row["data_sha256"] != plan.data_sha256:
        return "trained on other examples (data digest differs)"
    if row.get("eval") != plan.eval:
        return f"scored with another answer format: {row.get('eval')} -> {plan.eval}"
    return _end_token_problem(row, plan.end_token)


def _end_token_problem(row: dict, end_token: str | None) -> str | None:
    """Why a row's targets do not end with this tokenizer's `end_token` (None: they do, or either is unknown)."""
    if end_token and row.get("end_token", end_token) != end_token:
        return f"targets ended with {row['end_token']!r}; this tokenizer ends them with {end_token!r}"
    return None


def _problems_without_data(cfg: DictConfig, manifest: dict, exc: Exception, end_token: str | None
                           ) -> dict[str, str | None]:
    """Staleness when the training data cannot be read here: recorded hyperparameters (task_cfg included) and
    end token only, or, for rows without records, the whole recorded ``train`` config (the rule before per-expert
    records)."""
    log.warning("expert pool %s: training data unavailable (%s); judged by recorded hyperparameters, data "
                "digests not checked", cfg.name, exc)
    rows = {r["name"]: r for r in manifest.get("experts") or []}
    whole = manifest.get("train") == OmegaConf.to_container(cfg.train, resolve=True)
    out: dict[str, str | None] = {}
    for name in expert_names(cfg):
        row = rows.get(name)
        if row is None:
            out[name] = "not trained"
        elif not _adapter_saved(Path(cfg.dir), name):
            out[name] = "adapter files missing"
        elif "train" in row:
            same = row["train"] == _hyper(effective_train(cfg, name))
            out[name] = _end_token_problem(row, end_token) if same else "trained with other hyperparameters"
        else:
            out[name] = None if whole else "trained with another training config"
    return out


def stale_experts(cfg: DictConfig, lm: LanguageModel, data_root: str | None = None) -> dict[str, str | None]:
    """Each expert of the pool -> why it must be (re)trained, or None when it is current."""
    data_root = data_root if data_root is not None else default_data_root()
    manifest = read_manifest(cfg, data_root)
    names = expert_names(cfg)
    per_expert_overrides(cfg)  # a bad override is an error even when the pool must be trained anyway
    if manifest is None:
        return {n: "not trained yet (no manifest.json)" for n in names}
    if manifest.get("base_fingerprint") != fingerprint(lm.base_model):
        return {n: "trained on other base-model weights (fingerprint differs)" for n in names}
    try:
        _, plans = plan_pool(cfg, data_root, lm.tokenizer.eos_token)
    except DataError as exc:
        return _problems_without_data(cfg, manifest, exc, lm.tokenizer.eos_token)
    rows = {r["name"]: r for r in manifest.get("experts") or []}
    unrecorded = [n for n, r in rows.items() if "end_token" not in r]
    if unrecorded:
        log.warning("pool %s: %s predate recorded end tokens (their targets may end with another EOS than %r, "
                    "which fitted methods' losses then count against them; `python -m bench.run.train_experts force=true` retrains)",
                    cfg.name, unrecorded, lm.tokenizer.eos_token)
    return {p.name: expert_problem(p, rows.get(p.name), Path(cfg.dir)) for p in plans}


def pool_problem(cfg: DictConfig, lm: LanguageModel, data_root: str | None = None) -> str | None:
    """Why a trained pool's cache cannot be used as is (None when every expert is complete and current)."""
    stale = {n: why for n, why in stale_experts(cfg, lm, data_root).items() if why}
    if not stale:
        return None
    reasons = set(stale.values())
    if len(stale) == len(expert_names(cfg)) and len(reasons) == 1:
        return f"{reasons.pop()} (all {len(stale)} experts)"
    return "stale experts: " + "; ".join(f"{n}: {why}" for n, why in stale.items())


def write_manifest(cfg: DictConfig, lm: LanguageModel, base_fp: str, plans: list[ExpertPlan], rows: dict,
                   command: str | None = None, rescored_by: str | None = None) -> dict:
    """The manifest of the experts that have rows, in pool order; its pool ``data_sha256`` is one sha256 over
    those experts' examples in that order (for a complete pool: every expert's, as before per-expert rows).
    `command`: the training command to record (default: this process's); `rescored_by`: the command that scored
    the experts again after training (`bench.experts.pools.rescore_pool`), recorded when given."""
    present = [p for p in plans if p.name in rows]
    manifest = {
        "pool": cfg.name, "base_model": lm.model_id, "base_fingerprint": base_fp,
        "command": command or " ".join(sys.argv), "train": OmegaConf.to_container(cfg.train, resolve=True),
        "data_sha256": examples_sha256([e for p in present for e in p.examples]), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "experts": [rows[p.name] for p in present],
    }
    if rescored_by:
        manifest["rescored_by"] = rescored_by
    write_json_atomic(Path(cfg.dir) / MANIFEST, manifest)
    return manifest


def train_if_stale(cfg: DictConfig, folder: Path, problem: Callable[[], str | None], train: Callable[[], None],
                   allowed: bool = True) -> None:
    """Train the pool at `folder` when `problem()` names one (or refuse when not `allowed`), under the folder's
    lock: jobs that start together on a cold cache train it once; the others wait, find it trained and go on."""
    first = problem()
    if not first:
        return
    if not allowed:
        raise AdapterError(f"expert pool {cfg.name!r} at {folder}: {first}; run `make experts`")
    with exclusive(folder, f"training expert pool {cfg.name}"):
        current = problem()  # another job may have trained it meanwhile
        if current:
            log.info("training expert pool %s (%s)", cfg.name, current)
            train()
