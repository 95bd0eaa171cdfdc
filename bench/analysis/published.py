"""The published records: the raw per-job records and predictions behind the committed leaderboard.

``results/published/<task>/<job_key>.json.gz`` holds one job: ``{"record": …, "predictions": […]}``. `make
leaderboard` rebuilds the committed tables from these files alone, so a fresh clone reproduces them byte for
byte; ``python -m bench.analysis.leaderboard --publish <runs dir>…`` copies finished jobs from run folders into it (the
maintainers' step after re-running a setting; a user's own runs never land here by themselves).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import PROJECT_ROOT
from bench.run.records import iter_records, record_problem

PUBLISHED_DIR = PROJECT_ROOT / "results" / "published"
PREDICTIONS = "predictions.jsonl"


@dataclass
class Job:
    """A finished job: its record and its per-example predictions (``source``: where it was read from)."""

    record: dict
    predictions: list[dict] = field(default_factory=list)
    source: str = ""


def read_predictions(record_path: Path) -> list[dict]:
    path = record_path.parent / PREDICTIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_archive(folder: Path, skipped: list[tuple[str, str]] | None = None) -> list[Job]:
    jobs = []
    for path in sorted(folder.rglob("*.json.gz")):
        try:
            payload = json.loads(gzip.decompress(path.read_bytes()))
            problem = record_problem(payload.get("record")) if isinstance(payload, dict) else "not an object"
        except (OSError, ValueError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem:
            if skipped is not None:
                skipped.append((str(path), problem))
            continue
        jobs.append(Job(payload["record"], payload.get("predictions", []), str(path)))
    return jobs


def read_jobs(sources: list[Path], skipped: list[tuple[str, str]] | None = None) -> list[Job]:
    """Ok jobs from run folders (``record.json`` + ``predictions.jsonl``) and published archives, the newest
    record of each job key."""
    newest: dict[str, Job] = {}
    for source in sources:
        source = Path(source)
        found = read_archive(source, skipped) if any(source.rglob("*.json.gz")) else [
            Job({k: v for k, v in r.items() if k != "_path"}, read_predictions(Path(r["_path"])), r["_path"])
            for r in iter_records(source, skipped)]
        for job in found:
            if job.record.get("status") != "ok":
                continue
            key = job.record["job_key"]
            if key not in newest or job.record.get("finished_at", "") > newest[key].record.get("finished_at", ""):
                newest[key] = job
    return sorted(newest.values(), key=lambda j: (j.record["task"], j.record["method"], j.record["job_key"]))


def publish(run_dirs: list[Path], out: Path = PUBLISHED_DIR) -> list[Path]:
    """Copy every ok job under `run_dirs` (with its predictions) into the archive `out`; returns the files."""
    written = []
    for job in read_jobs(run_dirs):
        if not job.predictions:
            continue  # nothing to resample: not publishable
        path = out / job.record["task"] / f"{job.record['job_key']}.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"record": job.record, "predictions": job.predictions}, sort_keys=True, default=str)
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
        written.append(path)
    return written
