"""Per-job JSON records (DESIGN §7): identity, atomic writes, validation and the resume lookup.

A job is identified by its key (`input_key`): a hash of its config key (`job_key`: the resolved config without
the keys that do not change results — paths, launcher, logging, `force`, generation batching) and of the digests
of what it reads (`bench.run.inputs`: adapter files, data files, the model, the project version). A record is written once, atomically (temp file + fsync +
rename), into the job's output directory; resume searches `paths.runs_dir` for a record with the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.config import PROJECT_ROOT

log = logging.getLogger("bench")
RECORD_FILE = "record.json"
# Config keys that do not change a job's results.
VOLATILE_KEYS = ("hydra", "paths", "force", "rescore", "wandb", "device", "save_composed", "progress", "generation")
LIBRARIES = ("torch", "transformers", "peft", "diffusers", "open_clip_torch", "nevergrad", "lm-eval", "hydra-core")


# Where things are on disk rather than what they are: (group, key) left out of a job's key, so a checkout at
# another path (another machine, a cluster node) finds the same jobs done. A trained pool is defined by its
# name and training config (its manifest vouches for the files); an adapter list keeps its paths.
LOCATION_KEYS = ("dir", "hub_cache")  # of an experts config: where its pool lies, not what it is


def job_config(cfg: DictConfig, seeded: bool = True) -> dict:
    """The resolved config that defines a job's result (without the seed when `seeded` is False: a job
    whose result no seed can change), without the volatile keys and the on-disk locations."""
    data = OmegaConf.to_container(cfg, resolve=True)
    volatile = VOLATILE_KEYS if seeded else (*VOLATILE_KEYS, "seed")
    out = {k: v for k, v in data.items() if k not in volatile}
    experts = out.get("experts")
    if isinstance(experts, dict):  # a pool's, and a joined pool's members', locations
        members = experts.get("members") or {}
        out["experts"] = {**_without_locations(experts),
                          **({"members": {k: _without_locations(m) for k, m in members.items()}} if members else {})}
    return out


def _without_locations(experts: dict) -> dict:
    return {k: v for k, v in experts.items() if k not in LOCATION_KEYS}


def job_key(cfg: DictConfig, seeded: bool = True) -> str:
    """The config key: a hash of `job_config` (what the user asked for)."""
    canonical = json.dumps(job_config(cfg, seeded), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def input_key(config_key: str, inputs: dict) -> str:
    """The job key: the config key and the digests of what the job reads (`bench.run.inputs.job_inputs`)."""
    canonical = json.dumps({"config": config_key, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


STATUSES = ("ok", "failed", "running")
METRIC_RANGES = {"exact_match": (0.0, 1.0), "clip_t": (-1.0, 1.0), "clip_i": (-1.0, 1.0)}  # clip_i/<subject> too
RECORD_FIELDS = {"job_key": str, "status": str, "profile": str, "method": str, "task": str, "seed": int}
ROW_FIELDS = {"subtask": str, "metric": str, "value": (int, float), "n": int}


def record_problem(record) -> str | None:
    """Why `record` (a parsed record.json) cannot be used, or None: its shape, status, and for an ok record
    non-empty rows with finite values in their metric's range."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for field, kind in RECORD_FIELDS.items():
        if field not in record:
            return f"no {field!r}"
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            return f"{field!r} is {record[field]!r}, not {getattr(kind, '__name__', kind)}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {STATUSES}"
    if record["status"] != "ok":
        return None
    rows = record.get("rows")
    if not isinstance(rows, list) or not rows:
        return "status ok but no rows"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"rows[{i}] is not an object"
        for field, kind in ROW_FIELDS.items():
            value = row.get(field)
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"rows[{i}].{field} is {value!r}"
        if not math.isfinite(row["value"]):
            return f"rows[{i}] ({row['metric']}) value {row['value']!r} is not finite"
        low, high = METRIC_RANGES.get(row["metric"].split("/")[0], (-math.inf, math.inf))
        if not low <= row["value"] <= high:
            return f"rows[{i}] ({row['metric']}) value {row['value']} outside [{low:g}, {high:g}]"
        if row["n"] < 0:
            return f"rows[{i}].n is {row['n']}"
    return None


def iter_records(runs_dir: str | Path, skipped: list[tuple[str, str]] | None = None):
    """Every usable record under `runs_dir`. A file that cannot be read or parsed, or fails `record_problem`,
    is skipped with a warning naming it (and appended to `skipped` as (path, reason)): the job it belonged to
    counts as not done."""
    for path in sorted(Path(runs_dir).rglob(RECORD_FILE)):
        try:
            record = json.loads(path.read_text())
            problem = record_problem(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem:
            log.warning("skipping record %s: %s", path, problem)
            if skipped is not None:
                skipped.append((str(path), problem))
            continue
        record["_path"] = str(path)
        yield record


def find_records(records: Iterable[dict], queries: dict[str, str],
                 status: str | None = "ok") -> dict[str, dict | None]:
    """For each `field: key` of `queries`, the newest of `records` (`iter_records`) whose `field` is `key` (with
    `status`, when given)."""
    newest: dict[str, dict | None] = dict.fromkeys(queries)
    for record in records:
        if status is not None and record.get("status") != status:
            continue
        for field, key in queries.items():
            best = newest[field]
            if record.get(field) == key and (best is None or record.get("finished_at", "") > best.get("finished_at", "")):
                newest[field] = record
    return newest


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


# The source a job's behaviour comes from (`code_digest`): the packages and the configs, not results or docs.
CODE_DIRS = ("bench", "methods", "tasks", "conf", "hydra_plugins")
CODE_SUFFIXES = (".py", ".yaml")


@lru_cache(maxsize=1)
def code_digest(root: Path = PROJECT_ROOT) -> str:
    """sha256 (16 hex) of the source files under `CODE_DIRS` — relative path and content of each, in path order.

    Names the code that ran where `git_sha` cannot: a copied or uncommitted tree (``-dirty``), or a checkout whose
    git metadata is stale. The same checkout gives the same digest on any machine and at any path."""
    h = hashlib.sha256()
    files = sorted((f for d in CODE_DIRS for f in (root / d).rglob("*")
                    if f.suffix in CODE_SUFFIXES and f.is_file() and "__pycache__" not in f.parts),
                   key=lambda f: f.relative_to(root).as_posix())
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def hardware(device) -> str:
    """What a job or benchmark ran on (`device`: a torch.device): the GPU's name, or the CPU's model and the
    threads torch uses."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model} ({torch.get_num_threads()} threads)"
