"""Per-job JSON records (DESIGN §7): identity, atomic writes, and the resume lookup.

A job is identified by `job_key`, a hash of its resolved config without the keys that do not change
results (paths, launcher, logging, `force`). A record is written once, atomically (temp file + fsync +
rename), into the job's output directory; resume searches `paths.runs_dir` for a record with the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.config import PROJECT_ROOT

RECORD_FILE = "record.json"
# Config keys that do not change a job's results.
VOLATILE_KEYS = ("hydra", "paths", "force", "rescore", "wandb", "device", "save_composed", "progress", "generation")
LIBRARIES = ("torch", "transformers", "peft", "diffusers", "open_clip_torch", "nevergrad", "lm-eval", "hydra-core")


# Where things are on disk rather than what they are: (group, key) left out of a job's key, so a checkout at
# another path (another machine, a cluster node) finds the same jobs done. A trained pool is defined by its
# name and training config (its manifest vouches for the files); an adapter list keeps its paths.
LOCATION_KEYS = (("experts", "dir"), ("experts", "hub_cache"))


def job_config(cfg: DictConfig, seeded: bool = True) -> dict:
    """The resolved config that defines a job's result (without the seed when `seeded` is False: a job
    whose result no seed can change), without the volatile keys and the on-disk locations."""
    data = OmegaConf.to_container(cfg, resolve=True)
    volatile = VOLATILE_KEYS if seeded else (*VOLATILE_KEYS, "seed")
    out = {k: v for k, v in data.items() if k not in volatile}
    for group, key in LOCATION_KEYS:
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k != key}
    return out


def job_key(cfg: DictConfig, seeded: bool = True) -> str:
    canonical = json.dumps(job_config(cfg, seeded), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iter_records(runs_dir: str | Path):
    """Every readable record under `runs_dir` (unreadable ones, e.g. hand-edited, are skipped)."""
    for path in Path(runs_dir).rglob(RECORD_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        record["_path"] = str(path)
        yield record


def find_record(runs_dir: str | Path, key: str, status: str | None = "ok") -> dict | None:
    """The newest record of job `key` (with `status`, when given)."""
    found = [r for r in iter_records(runs_dir) if r.get("job_key") == key and (status is None or r.get("status") == status)]
    return max(found, key=lambda r: r.get("finished_at", ""), default=None)


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
