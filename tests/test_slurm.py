"""The cluster path: the partition check, the job-state reader, and sweeps through `hydra/launcher=slurm` on a real
Slurm (CI starts a single-node one with `.ci/slurm.sh start` and sets BENCH_REQUIRE_SLURM=1; elsewhere the live
tests skip when no Slurm answers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.errors import ConfigError
from bench.run import slurm
from bench.run.launcher import signal_delay
from conftest import CACHE, ROOT


# ------------------------------------------------------------------------------------------ without Slurm
def fake_sinfo(monkeypatch, text: str) -> None:
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm, "_run", lambda argv: SimpleNamespace(returncode=0, stdout=text, stderr=""))


SINFO = "cpu*|64|256000|(null)|2-00:00:00\ngpu|32|512000|gpu:a100:4(S:0-1)|12:00:00\ngpu|16|128000|gpu:8|12:00:00\n"


def test_partition_limits_from_sinfo(monkeypatch):
    fake_sinfo(monkeypatch, SINFO)
    cpu = slurm.partition(None)
    assert (cpu.name, cpu.cpus, cpu.memory_mb, cpu.gpus, cpu.max_minutes) == ("cpu", 64, 256000, 0, 2880)
    gpu = slurm.partition("gpu")
    assert (gpu.cpus, gpu.memory_mb, gpu.gpus, gpu.max_minutes) == (32, 512000, 8, 720)
    with pytest.raises(ConfigError, match=r"'nope' is not a Slurm partition here; partitions: \['cpu', 'gpu'\]"):
        slurm.partition("nope")


def test_a_request_the_partition_cannot_run_is_refused_with_reasons(monkeypatch):
    fake_sinfo(monkeypatch, SINFO)
    assert slurm.check_request({"partition": "gpu", "cpus_per_task": 8, "gpus_per_node": 4, "mem_gb": 100,
                                "timeout_min": 600}).name == "gpu"
    with pytest.raises(ConfigError) as err:
        slurm.check_request({"cpus_per_task": 8, "gpus_per_node": 1, "mem_gb": 300, "timeout_min": 3000})
    message = str(err.value)
    for part in ("'cpu'", "1 GPUs per node, the partition's nodes have 0", "leave gpus_per_node unset",
                 "mem_gb=300", "timeout_min=3000, the partition's limit is 2880 min"):
        assert part in message
    assert "CPUs" not in message  # 8 of 64 fit


def test_time_and_gres_formats():
    assert [slurm._minutes(t) for t in ("infinite", "30", "1:30:00", "2-00:00:00", "10:00", "0:00:30")] == [
        None, 30, 90, 2880, 10, 1]
    assert [slurm._gpus(g) for g in ("(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,gpu:v100:2", "mps:100")] == [
        0, 4, 8, 4, 0]


def test_job_states_fall_back_to_squeue_when_accounting_is_off(monkeypatch):
    calls = []

    def run(argv):
        calls.append(argv[0])
        if argv[0] == "sacct":
            return SimpleNamespace(returncode=1, stdout="", stderr="Slurm accounting storage is disabled")
        return SimpleNamespace(returncode=0, stdout="12|RUNNING\n13|CANCELLED by 0\n", stderr="")

    monkeypatch.setattr(slurm, "_run", run)
    states = slurm.JobStates("auto")
    assert states.poll(["12", "13"]) == {"12": "RUNNING", "13": "CANCELLED"}
    assert states.poll(["12"]) and calls == ["sacct", "squeue", "squeue"]  # sacct is not asked again
    with pytest.raises(RuntimeError, match="accounting storage is disabled"):
        slurm.JobStates(True).poll(["12"])
    assert [slurm.outcome(s) for s in ("CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY")] == [
        "cancelled", "timeout", "preempted", "failed", "failed"]


def test_short_time_limits_get_a_signal_delay_that_fits():
    assert signal_delay(240, 120) == 120
    assert signal_delay(2, 120) == 30  # the default 120 s would signal a 2-minute job as it starts
    assert signal_delay(1, 120) == 15


# ------------------------------------------------------------------------------------------ on a real Slurm
def slurm_answers() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


live = pytest.mark.skipif(not os.environ.get("BENCH_REQUIRE_SLURM") and not slurm_answers(),
                          reason="no Slurm answers here (.ci/slurm.sh start runs one)")
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=10", "hydra.launcher.poll_s=1", "task=algorithmic", "profile=smoke",
            f"paths.cache_dir={CACHE}"]


def start(runs: Path, name: str, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "SWEEP_NAME": name, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "bench", "-m", *LAUNCHER, f"paths.runs_dir={runs}", *overrides]
    return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, runs: Path, name: str) -> tuple[int, Counter, str]:
    out = proc.communicate(timeout=900)[0]
    (sweep_dir,) = (runs / "sweeps").glob(f"{name}_*")
    jobs = sweep_dir / "jobs.jsonl"
    lines = jobs.read_text().splitlines() if jobs.is_file() else []
    return proc.returncode, Counter(json.loads(line)["status"] for line in lines), out


def ok_records(runs: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in runs.rglob("record.json")]
    return [r for r in records if r["status"] == "ok"]


def slurm_jobs(name: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i|%T"], capture_output=True, text=True)
    return out.stdout.split()


@live
def test_cells_are_filtered_before_submission_and_jobs_are_named(tmp_path):
    runs = tmp_path / "runs"
    code, statuses, out = finish(start(runs, "first", "method=base,linear,ties", "seed=0,1"), runs, "first")
    assert code == 0, out[-3000:]
    assert "6 cell(s), 3 to submit (0 done, 3 duplicate, 0 invalid)" in out  # seed-free cells: one job each
    assert statuses == {"ok": 3, "skipped": 3}
    assert sorted(r["method"] for r in ok_records(runs)) == ["base", "linear", "ties"]
    for method in ("base", "linear", "ties"):
        assert slurm_jobs(f"{method}-algorithmic-s0"), f"no Slurm job named {method}-algorithmic-s0"
    code, statuses, out = finish(start(runs, "again", "method=base,linear,ties", "seed=0,1"), runs, "again")
    assert code == 0 and "0 to submit (6 done" in out and statuses == {"skipped": 6}
    assert len(ok_records(runs)) == 3


@live
def test_a_cancelled_job_is_noted_the_sweep_finishes_and_a_rerun_resumes_it(tmp_path):
    """Followed through squeue only (a cluster without accounting): one of two jobs is scancelled mid-run; the
    driver notes it, prints the summary and exits 1; the re-run submits only that cell; no record twice."""
    runs = tmp_path / "runs"
    cells = ("method=mole", "method.steps=150", "seed=0,1")
    proc = start(runs, "cancel", *cells, "hydra.launcher.accounting=false")
    deadline = time.time() + 300
    while not any(j.endswith("|RUNNING") for j in slurm_jobs("mole-algorithmic-s1")):
        assert time.time() < deadline and proc.poll() is None, "the job never ran"
        time.sleep(1)
    subprocess.run(["scancel", "-n", "mole-algorithmic-s1"], check=True)
    code, statuses, out = finish(proc, runs, "cancel")
    assert code == 1, out[-3000:]
    assert statuses == {"ok": 1, "cancelled": 1}
    assert "1 ran ok, 0 skipped (already done), 0 failed, 1 cancelled" in out
    assert [r["seed"] for r in ok_records(runs)] == [0]
    code, statuses, out = finish(start(runs, "resume", *cells), runs, "resume")
    assert code == 0, out[-3000:]
    assert "2 cell(s), 1 to submit (1 done" in out and statuses == {"skipped": 1, "ok": 1}
    records = ok_records(runs)
    assert sorted(r["seed"] for r in records) == [0, 1] and len({r["job_key"] for r in records}) == 2


def test_local_jobs_get_gpus_of_their_own(monkeypatch):
    from bench.run.launcher import GpuSlots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    slots = GpuSlots.from_machine(1)
    assert slots.capacity == 3
    held = [slots.take() for _ in range(3)]
    assert held == [(2,), (3,), (5,)] and slots.free == []
    slots.give(held[1])
    assert slots.take() == (3,)
    pairs = GpuSlots([0, 1, 2, 3, 4], 2)
    assert pairs.capacity == 2 and pairs.take() == (0, 1) and pairs.take() == (2, 3)
    with pytest.raises(ConfigError, match="gpus_per_node=4, but this machine shows 3 GPU"):
        GpuSlots.from_machine(4)


def test_a_local_sweep_runs_one_job_per_gpu(tmp_path):
    """slurm_local with gpus_per_node=1 on a machine showing two GPUs: two jobs at a time, each on its own."""
    runs = tmp_path / "runs"
    env = {**os.environ, "SWEEP_NAME": "gpus", "CUDA_VISIBLE_DEVICES": "0,1"}
    argv = [sys.executable, "-m", "bench", "-m", "hydra/launcher=slurm_local", "hydra.launcher.gpus_per_node=1",
            "method=base,linear,ties", "task=algorithmic", "profile=smoke", "device=cpu", f"paths.runs_dir={runs}",
            f"paths.cache_dir={CACHE}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "local GPUs [0, 1]: 2 job(s) at a time, 1 GPU(s) each" in out
    gpus = [line.rsplit(" on GPU ", 1)[1] for line in out.splitlines() if "submitted as job" in line]
    assert sorted(gpus[:2]) == ["0", "1"] and len(gpus) == 3
    assert len(ok_records(runs)) == 3


def test_a_launcher_whose_optional_package_is_missing_is_refused_with_what_to_install(monkeypatch):
    import importlib.util

    from bench.run.validate import check_launcher

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_submitit_launcher" else real(name, *a))
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs the hydra-submitit-launcher package"):
        check_launcher(["-m", "method=linear", "hydra/launcher=slurm"])
    check_launcher(["-m", "method=linear", "hydra/launcher=parallel"])  # joblib's plugin is installed here
    check_launcher(["method=linear"])


def test_without_submitit_the_plugin_module_imports_and_defines_no_launchers(monkeypatch):
    """Hydra imports every hydra_plugins module on each run: without the optional package this one must import
    quietly (no 'Error importing' warning on every command) and register nothing."""
    import importlib.util

    import hydra_plugins.bench_launcher as installed

    for name in ("", ".config", ".submitit_launcher"):  # importing them now raises ImportError
        monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher" + name, None)
    spec = importlib.util.spec_from_file_location("bench_launcher_without_submitit", installed.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SUBMITIT is False and not hasattr(module, "BenchSlurmLauncher")
    assert installed.SUBMITIT is True and hasattr(installed, "BenchSlurmLauncher")
