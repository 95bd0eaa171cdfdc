"""The leaderboard from a fixed set of records equals a hand-computed table."""

import json
import math

import pandas as pd
import pytest

from bench.leaderboard import build, load_rows, write


def record(path, key, method, seed, values, variant="", status="ok", finished="2026-01-01T00:00:00"):
    rows = []
    for subtask, value in values.items():
        rows.append({"variant": variant, "subtask": subtask, "metric": "exact_match", "value": value, "n": 10,
                     "unit": subtask, "fit_examples": 5, "fit_steps": 2, "fit_seconds": 1.0, "eval_seconds": 2.0,
                     "trained_params": 7, "fit_info": {}})
    rows.append({**rows[0], "subtask": "all", "value": sum(values.values()) / len(values), "n": 10 * len(values)})
    path.mkdir(parents=True)
    (path / "record.json").write_text(json.dumps({
        "job_key": key, "status": status, "profile": "p", "domain": "nlp", "task": "t", "method": method,
        "seed": seed, "meaningful": True, "rows": rows, "peak_memory_mb": 100.0, "finished_at": finished}))


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "single", 0, {"a": 0.5, "b": 0.7}, variant="expert=x")
    record(r / "2", "k2", "single", 0, {"a": 0.2, "b": 0.2}, variant="expert=y")
    record(r / "3", "k3", "linear", 0, {"a": 0.4, "b": 0.6})
    record(r / "4", "k4", "linear", 1, {"a": 0.6, "b": 0.8})
    record(r / "5", "k4", "linear", 1, {"a": 0.0, "b": 0.0}, finished="2025-01-01T00:00:00")  # older duplicate
    record(r / "6", "k5", "linear", 2, {"a": 1.0, "b": 1.0}, status="failed")  # failed: ignored
    return r


def test_leaderboard_by_hand(runs, tmp_path):
    overall, per_subtask = build(load_rows(runs))
    linear = overall[overall.method == "linear"].iloc[0]
    # seed 0: macro 0.5; seed 1: macro 0.7 (the newer record of k4) -> mean 0.6, sample std 0.1414
    assert linear["mean"] == pytest.approx(0.6) and linear["std"] == pytest.approx(math.sqrt(0.02))
    assert linear["n_seeds"] == 2 and linear["n_examples"] == 20
    best_single = 0.6  # expert=x macro (0.5 + 0.7) / 2
    assert linear["best_single"] == pytest.approx(best_single)
    assert linear["normalized"] == pytest.approx(0.6 / best_single)
    assert linear["fit_seconds"] == 1.0 and linear["trained_params"] == 7
    single_y = overall[(overall.method == "single") & (overall.variant == "expert=y")].iloc[0]
    assert single_y["normalized"] == pytest.approx(0.2 / 0.6) and single_y["std"] == 0.0
    a = per_subtask[(per_subtask.method == "linear") & (per_subtask.subtask == "a")].iloc[0]
    assert a["mean"] == pytest.approx(0.5) and a["normalized"] == pytest.approx(0.5 / 0.5)
    write(runs, tmp_path / "out", plots=True)
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert len(csv) == 3 and not csv.duplicated(["profile", "task", "method", "variant", "metric"]).any()
    assert (tmp_path / "out" / "leaderboard.md").read_text().count("| t ") == 3
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == ["p_t_exact_match.png", "p_t_exact_match_cost.png"]


def test_in_domain_rows_are_normalized_by_each_subtasks_own_expert(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "single", 0, {"a": 0.5, "b": 0.2}, variant="expert=a")
    record(r / "2", "k2", "single", 0, {"a": 0.1, "b": 0.8}, variant="expert=b")
    record(r / "3", "k3", "mole", 0, {"a": 0.25, "b": 0.6})
    overall, per_subtask = build(load_rows(r))
    mole = overall[overall.method == "mole"].iloc[0]
    assert mole["normalized_own"] == pytest.approx((0.25 / 0.5 + 0.6 / 0.8) / 2)  # 0.625
    assert mole["normalized"] == pytest.approx(0.425 / 0.45)  # ÷ the best single expert's macro score
    own = per_subtask.set_index(["method", "variant", "subtask"])["own_expert"]
    assert own[("mole", "", "a")] == 0.5 and own[("mole", "", "b")] == 0.8


def test_an_own_expert_scoring_zero_is_left_out_of_the_own_normalization(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "single", 0, {"a": 0.5, "b": 0.2}, variant="expert=a")
    record(r / "2", "k2", "single", 0, {"a": 0.1, "b": 0.0}, variant="expert=b")
    record(r / "3", "k3", "mole", 0, {"a": 0.25, "b": 0.6})
    overall, _ = build(load_rows(r))
    assert overall[overall.method == "mole"].iloc[0]["normalized_own"] == pytest.approx(0.5)


def test_cross_task_rows_have_no_own_expert_normalization(runs):
    overall, _ = build(load_rows(runs))  # subtasks a, b; experts x, y: no subtask has its own expert
    assert overall["normalized_own"].isna().all()


def test_update_replaces_only_the_rerun_cells(runs, tmp_path):
    """A committed leaderboard updated with re-run linear records: linear's rows are the new ones, single's are
    kept, and linear's normalization uses the kept single rows."""
    out = tmp_path / "out"
    write(runs, out, plots=False)
    before = pd.read_csv(out / "leaderboard.csv")
    rerun = tmp_path / "rerun"
    record(rerun / "1", "k3", "linear", 0, {"a": 0.1, "b": 0.3})
    record(rerun / "2", "k4", "linear", 1, {"a": 0.3, "b": 0.5})
    write(rerun, out, plots=False, replace=True)
    after = pd.read_csv(out / "leaderboard.csv")
    assert len(after) == len(before) == 3
    linear = after[after.method == "linear"].iloc[0]
    assert linear["mean"] == pytest.approx(0.3) and linear["n_seeds"] == 2
    assert linear["normalized"] == pytest.approx(0.3 / 0.6)  # best single (expert=x) kept from the first build
    single = ["method", "variant", "mean", "std", "normalized"]
    pd.testing.assert_frame_equal(after[after.method == "single"][single].reset_index(drop=True),
                                  before[before.method == "single"][single].reset_index(drop=True))
    subtasks = pd.read_csv(out / "leaderboard_subtasks.csv")
    a = subtasks[(subtasks.method == "linear") & (subtasks.subtask == "a")].iloc[0]
    assert a["mean"] == pytest.approx(0.2) and len(subtasks) == 6
