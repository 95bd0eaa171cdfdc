"""The published records: the raw per-job records and predictions behind the committed leaderboard.

``results/published/<task>/<job_key>.json.gz`` holds one job: ``{"record": …, "predictions": […]}``, or, compact
(what `publish` writes): ``{"record": …, "examples": <digest>, "predictions": {<variant>: {"answer": […], "correct":
[…]}}}``, the examples themselves (subtask, input, target, in the job's order) stored once per task in
``examples/<digest>.json.gz`` and shared by every job scored on them; the raw generations stay in the run folders
(a 5,836-example job is 36 kB instead of 330 kB). A fit unit's ``fit_info`` (gate weights, learned coefficients),
repeated in every row the unit scored, is stored in its first row only (`shared_fit_info`; the others say
``{"$same_as_row": i}``) and restored on reading (`restore_fit_info`). `make
leaderboard` rebuilds the committed tables from these files alone, so a fresh clone reproduces them byte for
byte; ``python -m bench.analysis.leaderboard --publish <runs dir>…`` copies finished jobs from run folders into it (the
maintainers' step after re-running a setting; a user's own runs never land here by themselves).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.config import PROJECT_ROOT
from bench.files import write_bytes_atomic
from bench.run.records import iter_records, record_problem

PUBLISHED_DIR = PROJECT_ROOT / "results" / "published"
PREDICTIONS = "predictions.jsonl"
EXAMPLES_DIR = "examples"  # per task: the example lists that compact jobs share
TEXT_FIELDS = {"variant", "subtask", "input", "target", "generation", "answer", "correct"}  # what compact rows hold


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
    examples: dict[Path, list] = {}
    for path in sorted(p for p in folder.rglob("*.json.gz") if p.parent.name != EXAMPLES_DIR):
        try:
            payload = json.loads(gzip.decompress(path.read_bytes()))
            problem = record_problem(payload.get("record")) if isinstance(payload, dict) else "not an object"
            if not problem and "examples" in payload:
                source = path.parent / EXAMPLES_DIR / f"{payload['examples']}.json.gz"
                if source not in examples:
                    examples[source] = json.loads(gzip.decompress(source.read_bytes()))
                payload["predictions"] = expand(payload["predictions"], examples[source])
            if not problem:
                payload["record"]["rows"] = restore_fit_info(payload["record"]["rows"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem:
            if skipped is not None:
                skipped.append((str(path), problem))
            continue
        jobs.append(Job(payload["record"], payload.get("predictions", []), str(path)))
    return jobs


SAME_AS = "$same_as_row"


def shared_fit_info(rows: list[dict]) -> list[dict]:
    """`rows` with each ``fit_info`` equal to an earlier row's of the same unit replaced by a reference to it."""
    first: dict[tuple, int] = {}
    out = []
    for i, row in enumerate(rows):
        info = row.get("fit_info")
        if not info:
            out.append(row)
            continue
        key = (row.get("unit"), json.dumps(info, sort_keys=True, default=str))
        if key in first:
            row = {**row, "fit_info": {SAME_AS: first[key]}}
        else:
            first[key] = i
        out.append(row)
    return out


def restore_fit_info(rows: list[dict]) -> list[dict]:
    """The inverse of `shared_fit_info` (rows without references come back as they are)."""
    return [{**row, "fit_info": rows[row["fit_info"][SAME_AS]]["fit_info"]}
            if isinstance(row.get("fit_info"), dict) and SAME_AS in row["fit_info"] else row for row in rows]


def compact(predictions: list[dict]) -> tuple[list, dict] | None:
    """(examples, per-variant answers and correctness) of a job's prediction rows, when they are text rows (no
    other fields than `TEXT_FIELDS`) and every variant scored the same examples in the same order; None otherwise
    (then the rows are published as they are: e.g. an image task's CLIP scores)."""
    if any(not set(row) <= TEXT_FIELDS or not {"subtask", "input", "target"} <= set(row) for row in predictions):
        return None
    variants: dict[str, list[dict]] = {}
    for row in predictions:
        variants.setdefault(row.get("variant", ""), []).append(row)
    first = next(iter(variants.values()))
    examples = [[r["subtask"], r["input"], r["target"]] for r in first]
    for rows in variants.values():
        if [[r["subtask"], r["input"], r["target"]] for r in rows] != examples:
            return None
    return examples, {v: {"answer": [r["answer"] for r in rows], "correct": [r["correct"] for r in rows]}
                      for v, rows in variants.items()}


def expand(columns: dict, examples: list) -> list[dict]:
    """The prediction rows of a compact job (no generations)."""
    rows = []
    for variant, scored in columns.items():
        if len(scored["answer"]) != len(examples):
            raise ValueError(f"variant {variant!r} has {len(scored['answer'])} answers for {len(examples)} examples")
        rows.extend({"variant": variant, "subtask": t, "input": i, "target": y, "answer": a, "correct": c}
                    for (t, i, y), a, c in zip(examples, scored["answer"], scored["correct"]))
    return rows


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
    """Copy every ok job under `run_dirs` into the archive `out`, compact where it can be (module docstring);
    returns the files written (shared example lists included)."""
    written = []
    for job in read_jobs(run_dirs):
        if not job.predictions:
            continue  # nothing to resample: not publishable
        folder = out / job.record["task"]
        record = {**job.record, "rows": shared_fit_info(job.record.get("rows", []))}
        payload: dict = {"record": record, "predictions": job.predictions}
        packed = compact(job.predictions)
        if packed is not None:
            examples, columns = packed
            digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16]
            source = folder / EXAMPLES_DIR / f"{digest}.json.gz"
            if not source.is_file():
                written.append(_write_gz(source, examples))
            payload = {"record": record, "examples": digest, "predictions": columns}
        written.append(_write_gz(folder / f"{job.record['job_key']}.json.gz", payload))
    return written


def _write_gz(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, sort_keys=True, default=str)
    write_bytes_atomic(path, gzip.compress(text.encode(), mtime=0))
    return path
