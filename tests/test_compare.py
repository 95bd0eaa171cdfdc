"""Planned pairwise comparisons (bench/analysis/compare.py) on hand-made records: which of a pair is higher, its
difference and CI, Holm over the pairs asked for, other tasks left out, and a clear error for one method."""

from __future__ import annotations

import pytest

from bench.analysis.compare import compare, main
from bench.analysis.published import read_jobs
from bench.errors import ConfigError
from test_leaderboard import flags, record

N = 40


@pytest.fixture
def jobs(tmp_path):
    r = tmp_path / "runs"
    for seed in (0, 1):
        record(r / f"hi{seed}", f"h{seed}", "high", seed, {"a": flags(0.9, N), "b": flags(0.8, N)})
        record(r / f"lo{seed}", f"l{seed}", "low", seed, {"a": flags(0.1, N), "b": flags(0.2, N)})
        record(r / f"tw{seed}", f"t{seed}", "twin", seed, {"a": flags(0.1, N), "b": flags(0.2, N)})
    return read_jobs([r])


def test_pairs_are_ordered_tested_and_holm_corrected(jobs):
    table = compare(jobs, "t", ["low", "high", "twin"]).set_index(["higher", "lower"])
    assert len(table) == 3  # three pairs, one family
    far = table.loc[("high", "low")]
    assert far["difference"] == pytest.approx(0.85 - 0.15)
    assert far["ci_low"] > 0 and far["significant"] and far["p_holm"] < 0.05
    # identical answers: no difference, p = 1 (Holm never lowers it)
    same = table.loc[[i for i in table.index if set(i) == {"low", "twin"}][0]]
    assert same["difference"] == 0 and same["p_holm"] == 1.0 and not same["significant"]
    assert set(table["seeds"]) == {"2/2"}


def test_only_the_named_task_and_methods(jobs):
    assert compare(jobs, "other_task", ["low", "high"]).empty
    table = compare(jobs, "t", ["high", "low"])
    assert table[["higher", "lower"]].values.tolist() == [["high", "low"]]


def test_one_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="two or more distinct methods"):
        main(["linear", "linear", "--task", "bbh_cross"])


def test_a_method_with_several_configs_is_named_by_what_differs(tmp_path):
    import json

    r = tmp_path / "runs"
    for name, method, steps, score in [("m20", "mole", 20, 0.3), ("m80", "mole", 80, 0.6), ("lin", "linear", None, 0.5)]:
        record(r / name, name, method, 0, {"a": flags(score, N)})
        path = r / name / "record.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "method_params": {"steps": steps, "lr": 0.001}}))
    table = compare(read_jobs([r]), "t", ["mole", "linear"])
    pairs = {tuple(p) for p in table[["higher", "lower"]].values.tolist()}
    assert pairs == {("mole (steps=80)", "linear"), ("linear", "mole (steps=20)"), ("mole (steps=80)", "mole (steps=20)")}


def test_a_setting_prefix_keeps_that_setting_alone(tmp_path):
    r = tmp_path / "runs"
    for limit in (N, 20):
        record(r / f"hi{limit}", f"h{limit}", "high", 0, {"a": flags(0.9, N)}, limit=limit)
        record(r / f"lo{limit}", f"l{limit}", "low", 0, {"a": flags(0.1, N)}, limit=limit)
    jobs = read_jobs([r])
    both = compare(jobs, "t", ["high", "low"])
    assert len(both) == 2 and both["setting"].nunique() == 2
    key = both["setting"].iloc[0]
    one = compare(jobs, "t", ["high", "low"], setting_prefix=key[:4])
    assert one["setting"].tolist() == [key]
    with pytest.raises(SystemExit, match="no setting zz\\* of task 't'"):
        main(["high", "low", "--task", "t", "--setting", "zz", "--runs-dir", str(r)])


def test_subtasks_compare_the_macro_average_over_those_alone(tmp_path):
    r = tmp_path / "runs"
    for seed in (0, 1):
        record(r / f"hi{seed}", f"h{seed}", "high", seed, {"a": flags(0.9, N), "b": flags(0.2, N)})
        record(r / f"lo{seed}", f"l{seed}", "low", seed, {"a": flags(0.1, N), "b": flags(0.2, N)})
    jobs = read_jobs([r])
    whole = compare(jobs, "t", ["high", "low"]).iloc[0]
    assert whole["difference"] == pytest.approx((0.9 + 0.2) / 2 - (0.1 + 0.2) / 2) and whole["subtasks"] == "all"
    on_a = compare(jobs, "t", ["high", "low"], subtasks=["a"]).iloc[0]
    assert on_a["difference"] == pytest.approx(0.8) and on_a["significant"] and on_a["subtasks"] == "a"
    on_b = compare(jobs, "t", ["high", "low"], subtasks=["b"]).iloc[0]  # the same answers on b: no difference
    assert on_b["difference"] == 0 and (on_b["ci_low"], on_b["ci_high"]) == (0, 0) and on_b["p_holm"] == 1.0
    with pytest.raises(ConfigError, match="has no subtask c; it has a, b"):
        compare(jobs, "t", ["high", "low"], subtasks=["a", "c"])
