"""A 2×2×2 sweep through the submitit launcher (submitit_local: the Slurm code path on this machine)."""

import json
import os
import subprocess
import sys
from collections import Counter

from conftest import CACHE, ROOT


def sweep(runs, name):
    env = {**os.environ, "SWEEP_NAME": name, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "bench", "-m", "+sweep=smoke_grid", "hydra/launcher=slurm_local",
            f"paths.runs_dir={runs}", f"paths.cache_dir={CACHE}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep_dir,) = (runs / "sweeps").glob(f"{name}_*")
    statuses = Counter(json.loads(line)["status"] for line in (sweep_dir / "jobs.jsonl").read_text().splitlines())
    return statuses, proc.stdout + proc.stderr


def test_submitit_sweep_resumes(tmp_path):
    runs = tmp_path / "runs"
    statuses, log = sweep(runs, "first")
    assert statuses == {"ok": 8} and "8 ran ok, 0 skipped" in log
    records = sorted(runs.rglob("record.json"))
    assert len(records) == 8 and all(json.loads(p.read_text())["status"] == "ok" for p in records)
    statuses, _ = sweep(runs, "again")
    assert statuses == {"skipped": 8}  # a re-run does nothing
    records[3].unlink()  # a job killed before it finished leaves no record (writes are atomic)
    statuses, _ = sweep(runs, "resume")
    assert statuses == {"skipped": 7, "ok": 1}
    assert len(list(runs.rglob("record.json"))) == 8
