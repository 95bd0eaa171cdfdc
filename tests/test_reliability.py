"""Jobs a user can rely on: malformed records, resume keyed on inputs, failing sweeps, one-line config errors,
safe names and modes, and a first run that explains itself (each case failed before the fix)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.analysis.published import read_jobs
from bench.config import PROJECT_ROOT as ROOT
from bench.files import write_json_atomic
from bench.run.records import iter_records, record_problem
from conftest import random_adapter
from test_cli import bench, records

GOOD_ROW = {"variant": "", "subtask": "all", "metric": "exact_match", "value": 0.5, "n": 4, "unit": "all",
            "fit_seconds": 0.0, "eval_seconds": 1.0, "trained_params": 0, "fit_examples": 0, "fit_info": {}}
GOOD = {"job_key": "k1", "status": "ok", "profile": "smoke", "method": "linear", "task": "algorithmic", "seed": 0,
        "rows": [GOOD_ROW], "finished_at": "2026-12-01T00:00:00"}


def write_raw(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(text)
    return folder / "record.json"


BAD = {
    "list": ("[]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "string": ('"done"', "not a JSON object"),
    "truncated": (json.dumps(GOOD)[:40], "unreadable"),
    "no job_key": (json.dumps({k: v for k, v in GOOD.items() if k != "job_key"}), "no 'job_key'"),
    "ok without rows": (json.dumps({**GOOD, "rows": []}), "status ok but no rows"),
    "exact match 5": (json.dumps({**GOOD, "rows": [{**GOOD_ROW, "value": 5.0}]}), "outside [0, 1]"),
    "text value": (json.dumps({**GOOD, "rows": [{**GOOD_ROW, "value": "high"}]}), "rows[0].value"),
    "bad status": (json.dumps({**GOOD, "status": "done"}), "status 'done'"),
}


def test_every_malformed_record_is_named_skipped_and_the_rest_read(tmp_path, caplog):
    runs = tmp_path / "runs"
    paths = {name: write_raw(runs / name.replace(" ", "_"), text) for name, (text, _) in BAD.items()}
    write_raw(runs / "good", json.dumps(GOOD))
    skipped: list[tuple[str, str]] = []
    with caplog.at_level(logging.WARNING, logger="bench"):
        good = list(iter_records(runs, skipped))
    assert [r["job_key"] for r in good] == ["k1"]
    reasons = dict(skipped)
    for name, (_, reason) in BAD.items():
        assert reason in reasons[str(paths[name])], name
        assert str(paths[name]) in caplog.text
    assert [j.record["job_key"] for j in read_jobs([runs])] == ["k1"]  # the leaderboard reads the good one only
    assert record_problem({**GOOD, "status": "failed", "rows": []}) is None  # failed records carry no rows


def test_a_malformed_record_neither_blocks_nor_skips_jobs(tmp_path):
    """A `[]` record.json beside the runs does not crash later jobs; an ok record without rows does not count
    as done: the job runs."""
    runs = tmp_path / "runs"
    write_raw(runs / "junk", "[]")
    bench("method=linear", "task=algorithmic", runs=runs)
    (record,) = [r for r in records(runs) if isinstance(r, dict)]
    empty = {**record, "rows": []}
    write_json_atomic(Path(next(p for p in runs.rglob("record.json") if "junk" not in str(p))), empty)
    again = bench("method=linear", "task=algorithmic", runs=runs)
    assert "skip:" not in again.stdout + again.stderr
    assert sum(1 for r in records(runs) if isinstance(r, dict) and r.get("rows")) == 1


def test_leaderboard_lists_what_it_left_out(tmp_path, capsys):
    from bench.analysis.leaderboard import main

    runs = tmp_path / "runs"
    write_raw(runs / "good", json.dumps(GOOD))
    bad = write_raw(runs / "five", json.dumps({**GOOD, "job_key": "k2", "rows": [{**GOOD_ROW, "value": 5.0}]}))
    with pytest.raises(SystemExit):  # the good record has no predictions: nothing to tabulate
        main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--no-plots"])
    out = capsys.readouterr().out
    assert "record(s) left out" in out and str(bad) in out and "outside [0, 1]" in out


def test_records_are_readable_by_the_group(tmp_path):
    path = tmp_path / "r" / "record.json"
    write_json_atomic(path, GOOD)
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044


def test_retrained_adapters_at_the_same_path_re_run_the_job(tmp_path, tiny_lm):
    """The key covers adapter contents: new weights in the same folder re-run the job, and the log says so."""
    runs = tmp_path / "runs"
    folders = [random_adapter(tiny_lm.model, f"e{i}", tiny_lm.model_id, seed=i).save(tmp_path / f"e{i}")
               for i in range(2)]
    args = ("method=linear", "task=algorithmic", "experts=adapters", f"experts.adapters=[{folders[0]},{folders[1]}]")
    bench(*args, runs=runs)
    assert "skip:" in (second := bench(*args, runs=runs)).stdout + second.stderr
    random_adapter(tiny_lm.model, "e1", tiny_lm.model_id, seed=99).save(tmp_path / "e1")  # retrained in place
    third = bench(*args, runs=runs)
    out = third.stdout + third.stderr
    assert "skip:" not in out and "re-running job" in out and "experts." in out and "changed since" in out
    first, latest = sorted((r for r in records(runs)), key=lambda r: r["finished_at"])
    assert first["config_key"] == latest["config_key"] and first["job_key"] != latest["job_key"]


def test_changed_data_files_change_the_key(tmp_path):
    from bench.registry import get_task
    from bench.run.inputs import changed, job_inputs
    from test_configs import compose_with

    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh" / "bbh"
    if not src.is_dir():
        pytest.skip("no BBH data beside the project")
    data = tmp_path / "data" / "bbh" / "bbh"
    data.mkdir(parents=True)
    (data / "boolean_expressions.json").write_text((src / "boolean_expressions.json").read_text())
    cfg = compose_with(["task=bbh", "profile=smoke", f"paths.data_root={tmp_path / 'data'}",
                        f"paths.cache_dir={tmp_path / 'cache'}", "task.subtasks=[boolean_expressions]"])
    task = get_task("bbh")(cfg.task, cfg.paths.data_root)
    before = job_inputs(cfg, task)
    payload = json.loads((data / "boolean_expressions.json").read_text())
    payload["examples"] = payload["examples"][:-1]
    (data / "boolean_expressions.json").write_text(json.dumps(payload))
    assert changed(before, job_inputs(cfg, task)) == ["data.bbh/bbh/boolean_expressions.json"]


def test_a_sweep_whose_jobs_all_fail_exits_non_zero(tmp_path):
    runs = tmp_path / "runs"
    proc = bench("-m", "method=linear,ties", "task=algorithmic", "experts=adapters",
                 f"experts.adapters=[{tmp_path / 'missing'}]", runs=runs, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-2000:]
    assert "0 ran ok, 0 skipped (already done), 2 failed" in out
    failed = [line for line in out.splitlines() if "failed: " in line]
    assert len(failed) == 2 and "method=linear" in failed[0] and "method=ties" in failed[1]


@pytest.mark.parametrize("override,message", [
    ("seed=abc", "seed='abc': expected an integer"),
    ("seed=1.5", "seed=1.5: expected an integer"),
    ("fit_examples=five", "fit_examples='five': expected an integer"),
    ("task.limit=ten", "task.limit='ten': expected an integer"),
    ("method.lambda=abc", "method.lambda='abc': expected a number"),
    ("method.weights=[a,b]", "method.weights=['a', 'b']: expected numbers"),
    ("experts.train.subtasks=[nope]", "experts.train.subtasks: unknown algorithmic subtasks ['nope']"),
    ("device=cuda", "device=cuda: torch finds no CUDA device"),
])
def test_wrong_values_fail_in_one_line_naming_the_key(tmp_path, override, message):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = tmp_path / "runs"
    proc = bench("method=linear", "task=algorithmic", override, runs=runs, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and message in out, out[-2000:]
    assert "Traceback" not in out
    assert not runs.exists() or not any(runs.rglob("*.json")), "nothing written"


def test_a_missing_data_root_fails_at_once_without_the_hub(tmp_path):
    proc = bench("method=linear", "task=bbh", f"paths.data_root={tmp_path / 'nowhere'}", runs=tmp_path / "runs",
                 check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and f"paths.data_root={tmp_path / 'nowhere'} holds no bbh/bbh/" in out


def test_names_that_would_escape_the_runs_folder_are_refused_first(tmp_path):
    runs = tmp_path / "a" / "runs"
    proc = bench("method=linear", "task=algorithmic", "method.name=../../escaped", runs=runs, check=False)
    assert proc.returncode != 0 and "method.name='../../escaped'" in proc.stdout + proc.stderr
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("*escaped*"))


def test_a_first_run_explains_itself(tmp_path):
    """The closing lines: a per-subtask table beside the base model's scores on the same examples, and the
    record's folder; progress bars name the phase and the subtasks."""
    runs = tmp_path / "runs"
    bench("method=base", "task=algorithmic", runs=runs)
    proc = bench("method=linear", "task=algorithmic", runs=runs)
    out = proc.stdout
    assert "record: " in out and str(runs) in out
    table = out[: out.index("record: ")]
    assert any("linear" in line and "base" in line for line in table.splitlines())  # the columns
    for subtask in ("boolean_expressions", "word_sorting", "all"):
        assert subtask in table
    assert "eval algorithmic" in proc.stderr


def test_parallel_sweeps_do_not_interleave_progress_bars(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_JOBS", "2")
    proc = bench("-m", "hydra/launcher=parallel", "method=linear,ties", "task=algorithmic", runs=tmp_path / "runs")
    assert "2 ran ok" in proc.stdout + proc.stderr
    assert "eval algorithmic" not in proc.stderr


def test_perf_without_cuda_runs_the_quick_sizes(monkeypatch, capsys):
    import importlib

    import bench.perf.__main__ as perf_main

    seen = []

    class Fake:
        @staticmethod
        def main(argv):
            seen.append(argv)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib, "import_module", lambda name: Fake)
    perf_main.main(["merge"])
    perf_main.main(["merge", "--full"])
    assert seen == [["--quick"], []]
    assert "quick (CPU) sizes" in capsys.readouterr().out


def test_report_prints_no_nan_for_methods_without_variants(tmp_path, capsys):
    from bench.analysis.leaderboard import write
    from bench.analysis.report import main
    from test_leaderboard import flags, record

    runs = tmp_path / "runs"
    record(runs / "1", "k1", "linear", 0, {"a": flags(0.5)})
    write([runs], tmp_path / "out", plots=False)
    main(["--csv", str(tmp_path / "out" / "leaderboard.csv")])
    out = capsys.readouterr().out
    assert "linear" in out and "NaN" not in out and "nan" not in out


def test_the_base_job_prints_its_own_scores():
    """A `method=base` job's closing table shows its scores (its column is called base, like the reference's)."""
    from bench.run.job_report import score_table

    rows = [{"variant": "", "subtask": s, "metric": "exact_match", "value": v, "n": 20}
            for s, v in (("boolean_expressions", 0.25), ("word_sorting", 0.05), ("all", 0.15))]
    lines = score_table({"method": "base", "rows": rows}, None).splitlines()
    assert lines[0].split() == ["n", "base"]
    assert {line.split()[-3:][0]: line.split()[-1] for line in lines[2:]} == {
        "boolean_expressions": "0.250", "word_sorting": "0.050", "all": "0.150"}


def test_two_jobs_on_a_cold_cache_build_the_model_and_the_pool_once(tmp_path):
    """`make experts` twice at once (as two array tasks would): one converts the model and trains the pool,
    the other waits on the locks and reuses both."""
    env = {**os.environ, "BENCH_CACHE_DIR": str(tmp_path / "cache"), "BENCH_RUNS_DIR": str(tmp_path / "runs")}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.run.train_experts", "profile=smoke",
                               f"hydra.run.dir={tmp_path / f'h{i}'}"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "\n".join(outs)
    assert both.count("- training expert pool smoke_algorithmic") == 1, both
    assert "waiting for another process to finish" in both
    assert "is complete at" in both  # the waiting one found the pool trained


def test_the_code_digest_names_the_source_and_nothing_else(tmp_path):
    """Records carry `code_digest` because `git_sha` says only "-dirty" for an uncommitted or copied tree."""
    from shutil import copytree

    from bench.run.records import code_digest

    def tree(root: Path) -> Path:
        for rel, text in [("bench/a.py", "x = 1\n"), ("conf/m/x.yaml", "k: 1\n"), ("results/r.json", "{}"),
                          ("docs/d.md", "doc"), ("bench/__pycache__/a.pyc", "bytes")]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    digest = code_digest.__wrapped__
    root = tree(tmp_path / "one")
    first = digest(root)
    assert digest(copytree(root, tmp_path / "elsewhere")) == first  # another path, the same code
    for rel in ("results/r.json", "docs/d.md", "bench/__pycache__/a.pyc"):
        (root / rel).write_text("changed")
    assert digest(root) == first  # results, docs and bytecode are not code
    (root / "conf/m/x.yaml").write_text("k: 2\n")
    assert digest(root) != first
    (root / "conf/m/x.yaml").write_text("k: 1\n")
    (root / "conf/m/x.yaml").rename(root / "conf/m/y.yaml")
    assert digest(root) != first  # a renamed config is another config
    (root / "conf/m/y.yaml").rename(root / "conf/m/x.yaml")
    assert digest(root) == first
