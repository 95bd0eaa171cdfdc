"""The end-of-sweep summary: how many jobs ran, were skipped, or failed (a Hydra callback).

Each job appends one line to ``<sweep dir>/jobs.jsonl`` (an O_APPEND write of one short line, safe across
the processes of parallel launchers), and the cluster driver (`bench.run.launcher`) one for each cell it skips or
whose job ends without a result; the callback counts them when the multirun ends, names the cells that did not
finish, and makes the process exit non-zero when any.
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


ENDED_BADLY = ("failed", "cancelled", "timeout", "preempted")  # statuses that make the sweep exit 1


class SweepSummary(Callback):
    """Logs the counts when the multirun ends (the cluster launcher also notes jobs that ended without a result:
    cancelled, timed out, preempted), names the cells that did not finish, and exits with status 1 if any
    (after the summary; `make sweep` then still tabulates what finished)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / JOBS_FILE
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        counts = Counter(line["status"] for line in lines)
        extra = "".join(f", {counts[s]} {s}" for s in ENDED_BADLY[1:] if counts.get(s))
        log.info("sweep %s: %d ran ok, %d skipped (already done), %d failed%s", config.hydra.sweep.dir,
                 counts.get("ok", 0), counts.get("skipped", 0), counts.get("failed", 0), extra)
        bad = [line for line in lines if line["status"] in ENDED_BADLY]
        for line in bad:
            log.error("%s: %s", line["status"], " ".join(line["overrides"]))
        if bad:
            log.error("re-run the same command to run only these")
            raise SystemExit(1)
