"""Unit-level resume: a job with several fit units (27 BBH tasks of the cross-task protocol, each fitted and scored
on its own) appends each finished unit's rows and predictions to ``units.jsonl`` in its run folder, flushed to disk.
When an attempt is killed (its record still says ``running``) or fails, the next run of the same job key takes the
units it finished from there instead of fitting and scoring them again, and says so in its record
(``resumed_units``). Same job key: same config, seed and input digests, so the carried units are what this run
would compute.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("bench")
UNITS_FILE = "units.jsonl"


def finished_units(records: Iterable[dict], job_key: str) -> tuple[str | None, dict[str, dict]]:
    """(folder, {unit: {"rows", "predictions"}}) of the newest unfinished attempt (status running or failed) at
    `job_key` among `records` (`bench.run.records.iter_records`) that finished any unit; (None, {}) when none did."""
    best: tuple[str, Path] | None = None
    for record in records:
        if record.get("job_key") != job_key or record.get("status") == "ok":
            continue
        folder = Path(record["_path"]).parent
        started = str(record.get("started_at", ""))
        if (folder / UNITS_FILE).is_file() and (best is None or started > best[0]):
            best = (started, folder)
    if best is None:
        return None, {}
    units = read_units(best[1] / UNITS_FILE)
    return (str(best[1]), units) if units else (None, {})


def read_units(path: Path) -> dict[str, dict]:
    """The complete lines of a units file (a line cut off by a kill is ignored)."""
    units: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: ignoring an incomplete line (the attempt was cut off while writing it)", path)
            continue
        units[entry["unit"]] = {"rows": entry["rows"], "predictions": entry["predictions"]}
    return units


def unit_count(output_dir: Path) -> int:
    """How many units the attempt in `output_dir` finished (complete lines of its units file)."""
    path = output_dir / UNITS_FILE
    return len(read_units(path)) if path.is_file() else 0


class UnitLog:
    """The run folder's ``units.jsonl``: carried units first, then each unit as it finishes."""

    def __init__(self, output_dir: Path, carried: dict[str, dict]) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / UNITS_FILE
        self.path.write_text("")
        for unit, data in carried.items():
            self.add(unit, data["rows"], data["predictions"])

    def add(self, unit: str, rows: list[dict], predictions: list[dict]) -> None:
        line = json.dumps({"unit": unit, "rows": rows, "predictions": predictions}, default=str)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
