"""The papers' BBH tables against the grid (bench/analysis/papers.py): printed averages checked against the tables'
own rows, collapsed rows weighted by their tasks, per-task gains compared by sign and rank and tested (paired
bootstrap, Holm), and the committed comparison rebuilt byte for byte."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from bench.analysis import papers
from bench.analysis.published import read_jobs
from bench.analysis.stats import REPLICATES
from bench.config import PROJECT_ROOT
from test_leaderboard import flags, record

PAPERS = PROJECT_ROOT / "results" / "papers"


def test_moles_printed_bbh_averages_are_not_its_rows_means():
    rows, printed, _ = papers.read_tables()
    avg = papers.averages(rows, printed).set_index(["table", "column"])
    # MoLE Table 3, BBH block, as printed (LoRAHub, PEMs, MoLE per task)
    table3 = {"lorahub": [55.1, 57.6, 31.0, 46.6, 41.4, 35.2, 19.9], "pems": [53.0, 51.1, 29.3, 47.2, 39.8, 37.5, 19.3],
              "mole": [57.3, 57.9, 30.7, 49.3, 45.0, 33.7, 21.2]}
    for column, values in table3.items():
        assert avg.loc[("mole_table3", column), "recomputed"] == pytest.approx(sum(values) / 7, abs=0.005)
    assert not avg.loc[("mole_table3", "lorahub"), "agrees"] and not avg.loc[("mole_table3", "pems"), "agrees"]
    assert avg.loc[("mole_table3", "mole"), "agrees"]
    assert avg.drop(index=[("mole_table3", "lorahub"), ("mole_table3", "pems")])["agrees"].all()


def test_a_collapsed_row_counts_for_each_of_its_tasks():
    rows = pd.DataFrame({"table": "t", "row": ["one", "three"], "tasks": [["a"], ["b", "c", "d"]], "column": "x",
                         "value": [10.0, 20.0]})
    by_tasks = papers.averages(rows, pd.DataFrame([{"table": "t", "column": "x", "printed": 17.5,
                                                    "weighting": "tasks"}]))
    by_rows = papers.averages(rows, pd.DataFrame([{"table": "t", "column": "x", "printed": 17.5,
                                                   "weighting": "rows"}]))
    assert by_tasks["recomputed"].item() == 17.5 and by_tasks["agrees"].item()
    assert by_rows["recomputed"].item() == 15.0 and not by_rows["agrees"].item()
    with pytest.raises(ValueError, match="t.y has no rows"):
        papers.averages(rows, pd.DataFrame([{"table": "t", "column": "y", "printed": 1.0, "weighting": "rows"}]))


def test_gains_average_the_grid_over_a_rows_tasks_and_compare_signs():
    rows = pd.DataFrame({"table": "mole_table3", "row": ["A", "A", "B", "B"],
                         "tasks": [["a"], ["a"], ["b", "c"], ["b", "c"]],
                         "column": ["mole", "lorahub", "mole", "lorahub"], "value": [50.0, 40.0, 30.0, 35.0]})
    grid = pd.DataFrame({"mole": [60.0, 10.0, 30.0], "lorahub": [50.0, 20.0, 30.0]}, index=["a", "b", "c"])
    g = papers.gains(rows, grid, "mole_table3").set_index("row")
    assert g.loc["A", "paper gain"] == 10.0 and g.loc["A", "ours gain"] == 10.0 and g.loc["A", "same sign"]
    assert g.loc["B", "ours mole"] == 20.0 and g.loc["B", "ours gain"] == -5.0  # (10 + 30) / 2 − (20 + 30) / 2
    assert g.loc["B", "paper gain"] == -5.0 and g.loc["B", "same sign"]
    with pytest.raises(ValueError, match=r"row 'A': the grid has no scores for \['a'\]"):
        papers.gains(rows, grid.drop(index="a"), "mole_table3")


def test_gain_tests_are_paired_bootstraps_over_a_rows_tasks_holm_corrected_over_the_table(tmp_path):
    runs = tmp_path / "runs"
    n = 100  # examples a subtask: enough that no replicate of 100 draws misses all of b's 50 differing ones
    same = {"c": flags(0.5, n)}
    for seed in (0, 1):
        # lorahub is right wherever base is: a per-example difference of 0 or 1, never negative
        record(runs / f"h{seed}", f"h{seed}", "lorahub", seed, {"a": flags(1.0, n), "b": flags(0.7, n), **same})
        record(runs / f"b{seed}", f"b{seed}", "base", seed, {"a": flags(0.0, n), "b": flags(0.2, n), **same})
        record(runs / f"m{seed}", f"m{seed}", "mole", seed, {"a": flags(1.0, n), "b": flags(0.7, n), **same})
    record(runs / "fold", "fold", "lorahub", 0, {"a": flags(1.0, n)}, limit=3)  # a smaller setting: not the grid
    setting = papers.grid_setting(read_jobs([runs]), task="t")
    assert sorted(setting.examples) == ["a", "b", "c"]
    rows = pd.DataFrame({"table": "lorahub_table1", "row": ["A", "BC", "C"], "tasks": [["a"], ["b", "c"], ["c"]],
                         "column": "lorahub", "value": 1.0})
    t = papers.gain_tests(setting, rows)["lorahub_table1"].set_index("row")
    assert t.loc["A", "ours gain 95% CI"] == "[+100.0, +100.0]" and t.loc["C", "ours gain 95% CI"] == "[+0.0, +0.0]"
    low, high = (float(x) for x in t.loc["BC", "ours gain 95% CI"].strip("[]").split(", "))
    assert 0 < low < 25 < high < 50  # (70 − 20) / 2 points over b and c, c adding nothing
    # no replicate of A or BC reaches 0: the bootstrap floor 2 / (B + 1), times Holm's 3 for the smallest p
    floor = round(3 * 2 / (REPLICATES + 1), 3)
    assert t.loc["A", "p (Holm)"] == floor and t.loc["BC", "p (Holm)"] == floor and t.loc["C", "p (Holm)"] == 1.0
    assert list(t["significant"]) == [True, True, False]
    with pytest.raises(ValueError, match="no other_task records"):
        papers.grid_setting(read_jobs([runs]), task="other_task")


def test_orderings_map_the_papers_columns_to_the_grids_methods():
    tables = pd.DataFrame({"table": "t", "row": ["8", "8", "8", "8", "24", "24", "24"],
                           "column": ["nla", "lorahub", "pems", "mole", "nla", "lorahub", "mole"],
                           "value": [32.7, 33.9, 33.7, 36.6, 37.0, 36.9, 38.7]})
    grid = pd.DataFrame({"linear": [20.0, 30.0], "lorahub": [30.0, 30.0], "mole": [28.0, 30.0]}, index=["a", "b"])
    o = papers.orderings(tables, grid).set_index("row")
    assert o.loc["8", "paper"] == "nla < lorahub < mole"  # PEMs has no counterpart: left out
    assert o.loc["8", "grid"] == "linear (25.0) < mole (29.0) < lorahub (30.0)" and not o.loc["8", "same order"]
    assert o.loc["24", "paper"] == "lorahub < nla < mole" and not o.loc["24", "same order"]
    with pytest.raises(ValueError, match=r"row '8': the grid has no \['mole'\]"):
        papers.orderings(tables, grid.drop(columns="mole"))


def test_spearman_is_a_rank_correlation():
    a = pd.Series([1.0, 2.0, 3.0, 4.0])
    assert papers.spearman(a, a ** 3) == pytest.approx(1.0)
    assert papers.spearman(a, -a) == pytest.approx(-1.0)
    assert papers.spearman(a, pd.Series([1.0, 1.0, 2.0, 2.0])) == pytest.approx(0.894427, abs=1e-6)


def test_the_committed_comparison_rebuilds_byte_for_byte(tmp_path):
    copy = shutil.copytree(PAPERS, tmp_path / "papers")
    written = papers.write(copy)
    assert written.read_bytes() == (PAPERS / "comparison.md").read_bytes(), \
        "results/papers/comparison.md differs from `make leaderboard`'s; run it and commit"
