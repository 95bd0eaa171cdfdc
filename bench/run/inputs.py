"""What a job reads besides its config, as digests, so that its key changes when any of it changes.

A job's key (`bench.run.records.job_key`) hashes its config together with `job_inputs`:

- ``project``: this project's version (pyproject), so a release that changes scoring re-runs jobs;
- ``model``: a local folder's files (sha256 of each), a hub id with its revision, the pip package version of a
  GGUF-packaged model; a model built from a config (tiny test models) is its config, already in the key;
- ``experts``: every adapter file of the pool (a peft folder's ``adapter_model.safetensors`` and
  ``adapter_config.json``, a trained pool's files and its manifest), a hub adapter id as given; a joined pool's,
  per member;
- ``data``: every data file the task reads for the chosen subtasks (`Task.data_files`).

File digests are sha256 of the whole file, cached on disk by (path, size, modification time) in
``<cache_dir>/digests.json``, so a job re-hashes only files that changed.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig

from bench.config import PROJECT_ROOT

CACHE_FILE = "digests.json"


class DigestCache:
    """sha256 of files, remembered by (resolved path, size, mtime_ns) across processes."""

    def __init__(self, cache_dir: str | Path | None) -> None:
        self.path = Path(cache_dir) / CACHE_FILE if cache_dir else None
        self.entries: dict[str, list] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def digest(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        known = self.entries.get(str(path))
        if known and known[:2] == stamp:
            return known[2]
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        self.entries[str(path)] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        """Write the cache (atomically; a lost race only costs a re-hash)."""
        if self.path is None or not self.dirty:
            return
        from bench.files import write_json_atomic

        try:
            write_json_atomic(self.path, self.entries)
        except OSError:
            pass


def files_digest(files: list[Path], cache: DigestCache, root: Path | None = None) -> dict[str, str]:
    """{name: sha256} of `files` (names relative to `root` when given); a missing file is "missing"."""
    out = {}
    for f in sorted(files):
        name = str(f.relative_to(root)) if root is not None else str(f)
        out[name] = cache.digest(f) if f.is_file() else "missing"
    return out


def project_version() -> str:
    try:
        return metadata.version("lora-compose-bench")
    except metadata.PackageNotFoundError:
        text = (PROJECT_ROOT / "pyproject.toml").read_text()
        return next((line.split("=", 1)[1].strip().strip('"') for line in text.splitlines()
                     if line.startswith("version")), "unknown")


def model_inputs(cfg: DictConfig, cache: DigestCache) -> dict:
    source = cfg.get("source")
    if source == "local":
        folder = Path(str(cfg.path)).expanduser()
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        return {"files": files_digest(files, cache, folder)}
    if source == "hub":
        return {"hub": str(cfg.id), "revision": cfg.get("revision")}
    if source == "gguf":
        try:
            return {"package": str(cfg.pip_name), "version": metadata.version(str(cfg.pip_name))}
        except metadata.PackageNotFoundError:
            return {"package": str(cfg.pip_name), "version": None}
    return {}


def adapter_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def expert_inputs(cfg: DictConfig, cache: DigestCache) -> dict:
    if cfg.get("source") == "pools":
        return {str(key): expert_inputs(member, cache) for key, member in (cfg.get("members") or {}).items()}
    if cfg.get("source") == "adapters":
        out = {}
        for source in cfg.get("adapters") or []:
            folder = Path(str(source)).expanduser()
            out[str(source)] = files_digest(adapter_files(folder), cache, folder) if folder.is_dir() else "hub"
        return out
    folder = Path(str(cfg.get("dir") or ""))
    if not cfg.get("dir") or not folder.is_dir():
        return {"pool": "absent"}  # trained by this job: the record's key is taken after training
    return files_digest(adapter_files(folder), cache, folder)


def job_inputs(cfg: DictConfig, task) -> dict:
    """The digests of everything `cfg`'s job reads besides its config (module docstring)."""
    cache = DigestCache(cfg.paths.get("cache_dir"))
    data_root = cfg.paths.get("data_root")
    data = task.data_files() if hasattr(task, "data_files") else []
    out = {
        "project": project_version(),
        "model": model_inputs(cfg.model, cache),
        "experts": expert_inputs(cfg.experts, cache),
        "data": files_digest(data, cache, Path(data_root) if data_root else None),
    }
    cache.save()
    return out


def changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The entries (dotted names) where two `job_inputs` differ."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def describe(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")

