"""Files written so that readers see the old version or the complete new one, never a partial write; folders
built by one process while the others wait (`exclusive`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a partial write."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, default=str).encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that readers see the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644 & ~_umask())  # readable by teammates on a shared disk, as a plain open() would be
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def exclusive(target: Path, what: str) -> Iterator[None]:
    """Hold the inter-process lock of `target` (the file ``.<name>.lock`` beside it): jobs that start together
    on a cold cache (a sweep's first wave, array tasks) build `target` once; the others wait here, then find it
    built. Callers check again inside the block. Not reentrant: take it once per process and target."""
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(target)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to finish %s (lock %s)", what, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
