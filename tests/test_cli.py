"""End to end through the CLI on the smoke profile: records, resume, bad inputs, an interrupted sweep."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.analysis.published import read_jobs
from conftest import CACHE, ROOT, random_adapter


def bench(*args, runs, check=True, cmd=("-m", "bench")):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    argv = [sys.executable, *cmd, *flags, "profile=smoke", f"paths.runs_dir={runs}", f"paths.cache_dir={CACHE}",
            *overrides]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in runs.rglob("record.json")]


def test_run_writes_record_then_skips(tmp_path):
    runs = tmp_path / "runs"
    bench("method=linear", "task=algorithmic", runs=runs)
    (record,) = records(runs)
    assert record["status"] == "ok" and record["method"] == "linear" and record["meaningful"] is False
    assert record["experts"] == ["boolean_expressions", "multistep_arithmetic", "word_sorting", "dyck_languages",
                                 "object_counting"]
    subtasks = {r["subtask"] for r in record["rows"]}
    assert subtasks == {"all", "boolean_expressions", "multistep_arithmetic", "word_sorting", "dyck_languages",
                        "object_counting"}
    assert all(r["n"] == 4 for r in record["rows"] if r["subtask"] != "all")
    for key in ("job_key", "git_sha", "code_digest", "versions", "config", "peak_memory_mb", "device", "seed"):
        assert key in record
    assert re.fullmatch(r".+ \(\d+ threads\)", record["hardware"])  # on CPU: its model and torch's threads
    assert (Path(record_path := next(runs.rglob("record.json"))).parent / "predictions.jsonl").is_file()
    second = bench("method=linear", "task=algorithmic", runs=runs)
    assert "skip" in second.stdout + second.stderr and len(records(runs)) == 1
    bench("method=linear", "task=algorithmic", "force=true", runs=runs)
    assert len(records(runs)) == 2 and record_path.is_file()


@pytest.mark.parametrize("args,message", [
    (["method=nope", "task=algorithmic"], "nope"),
    (["method=linear", "task=nope"], "nope"),
    (["method=linear", "task=algorithmic", "task.limit=0"], "task.limit=0"),
    (["method=linear", "task=bbh", "task.subtasks=[not_a_task]"], "unknown subtasks"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, args, message):
    runs = tmp_path / "runs"
    proc = bench(*args, runs=runs, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert records(runs) == []


def test_adapters_for_another_base_model(tmp_path, tiny_lm):
    folder = random_adapter(tiny_lm.model, "foreign", "org/some-other-model").save(tmp_path / "foreign")
    runs = tmp_path / "runs"
    proc = bench("method=linear", "task=algorithmic", "experts=adapters", f"experts.adapters=[{folder}]",
                 runs=runs, check=False)
    assert proc.returncode == 2 and "trained on base model 'org/some-other-model'" in proc.stdout + proc.stderr
    assert records(runs) == []


def test_interrupted_sweep_resumes_without_duplicates(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "bench", "-m", "profile=smoke", f"paths.runs_dir={runs}", f"paths.cache_dir={CACHE}",
            "task=algorithmic", "method=base,dare", "seed=0,1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    def ok():
        return [r for r in records(runs) if r["status"] == "ok"]

    while time.time() < deadline and not ok():
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # kill the sweep after its first finished job
    proc.wait()
    assert 1 <= len(ok()) < 3
    bench("-m", "task=algorithmic", "method=base,dare", "seed=0,1", runs=runs)
    finished = ok()
    # base is seed-free (one job for both seeds), dare is seeded: 3 jobs, none run twice
    assert len({r["job_key"] for r in finished}) == 3 and len(finished) == 3
    jobs = [(j.record["method"], j.record["seed"]) for j in read_jobs([runs])]
    assert len(jobs) == 3 and len(set(jobs)) == 3


NLP_METHODS = ["base", "single", "oracle", "linear", "ties", "dare", "magnitude_prune", "svd", "lora_lego", "lorahub",
               "mole", "lora_flow", "moa", "retriever", "lora_switch", "lora_composite",
               "knots", "core_space", "tsv", "iso_c", "iso_cts", "wudi", "della", "breadcrumbs", "cat", "arrow"]


def test_every_nlp_method_end_to_end_into_the_leaderboard(tmp_path):
    from bench.analysis.leaderboard import build

    runs = tmp_path / "runs"
    bench("-m", "task=algorithmic", f"method={','.join(NLP_METHODS)}", "fit_examples=2", runs=runs,
          check=False)
    done = {r["method"]: r["status"] for r in records(runs)}
    assert done == {m: "ok" for m in NLP_METHODS}, done
    overall, _ = build(read_jobs([runs]))
    assert set(overall["method"]) == set(NLP_METHODS)
    assert len(overall[overall.method == "single"]) == 5  # one row per expert


def test_rescore_refuses_a_dreambooth_pool(tmp_path):
    proc = bench("experts=smoke_dreambooth", "rescore=true", runs=tmp_path / "runs", check=False,
                 cmd=("-m", "bench.run.train_experts"))
    assert proc.returncode != 0 and "rescore=true scores language-model pools" in proc.stderr + proc.stdout
