"""The end-of-sweep summary: how many jobs ran, were skipped, or failed (a Hydra callback).

Each job appends one line to ``<sweep dir>/jobs.jsonl`` (an O_APPEND write of one short line, safe across
the processes of parallel launchers); the callback counts them when the multirun ends, names the failed
jobs, and makes the process exit non-zero when any failed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("bench")
JOBS_FILE = "jobs.jsonl"


def note_job(sweep_dir: str | Path, status: str, job_key: str | None, overrides: list[str]) -> None:
    line = json.dumps({"status": status, "job_key": job_key, "overrides": overrides}) + "\n"
    path = Path(sweep_dir) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def summarize(sweep_dir: str | Path) -> Counter:
    path = Path(sweep_dir) / JOBS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return Counter(json.loads(line)["status"] for line in lines)


class SweepSummary(Callback):
    """Logs the counts when the multirun ends and exits with status 1 if any job failed (after the summary;
    `make sweep` rebuilds the leaderboard of what finished either way)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        counts = summarize(config.hydra.sweep.dir)
        log.info("sweep %s: %d ran ok, %d skipped (already done), %d failed", config.hydra.sweep.dir,
                 counts.get("ok", 0), counts.get("skipped", 0), counts.get("failed", 0))
        if counts.get("failed", 0):
            failed = [json.loads(line)["overrides"] for line in
                      (Path(config.hydra.sweep.dir) / JOBS_FILE).read_text().splitlines()
                      if json.loads(line)["status"] == "failed"]
            for overrides in failed:
                log.error("failed: %s", " ".join(overrides))
            raise SystemExit(1)
