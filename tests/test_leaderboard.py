"""The leaderboard (bench/analysis/leaderboard.py) from fixed records and predictions: hand-computed means, settings that
are never averaged together, refused example mismatches, paired tests and ties, normalizations, and tables
reproduced byte for byte from published records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.analysis.leaderboard import build, main, write
from bench.analysis.published import publish, read_jobs

N = 10  # examples per subtask


def record(path: Path, key: str, method: str, seed: int, correct: dict[str, list[int]], variant: str = "",
           status: str = "ok", finished: str = "2026-01-01T00:00:00", limit: int = N, inputs: str = "q") -> None:
    """A job folder: record.json (rows per subtask and "all") and predictions.jsonl (one row per example)."""
    rows, preds = [], []
    for subtask, flags in correct.items():
        rows.append({"variant": variant, "subtask": subtask, "metric": "exact_match", "value": sum(flags) / len(flags),
                     "n": len(flags), "unit": subtask, "fit_examples": 5, "fit_steps": 2, "fit_seconds": 1.0,
                     "eval_seconds": 2.0, "trained_params": 7, "fit_info": {}})
        preds += [{"variant": variant, "subtask": subtask, "input": f"{inputs}{i}", "target": "t", "generation": "",
                   "answer": "", "correct": bool(c)} for i, c in enumerate(flags)]
    macro = sum(r["value"] for r in rows) / len(rows)
    rows.append({**rows[0], "subtask": "all", "value": macro, "n": sum(r["n"] for r in rows)})
    config = {"task": {"name": "t", "limit": limit}, "model": {"name": "m"}, "experts": {"name": "pool", "dir": "/x"},
              "fit_examples": 5}
    path.mkdir(parents=True)
    (path / "record.json").write_text(json.dumps({
        "job_key": key, "config_key": key, "status": status, "profile": "p", "domain": "nlp", "task": "t",
        "method": method, "seed": seed, "meaningful": True, "rows": rows, "peak_memory_mb": 100.0,
        "finished_at": finished, "config": config, "method_params": {}}))
    (path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))


def flags(score: float, n: int = N) -> list[int]:
    return [1] * round(score * n) + [0] * (n - round(score * n))


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "single", 0, {"a": flags(0.5), "b": flags(0.7)}, variant="expert=x")
    record(r / "2", "k2", "single", 0, {"a": flags(0.2), "b": flags(0.2)}, variant="expert=y")
    record(r / "3", "k3", "linear", 0, {"a": flags(0.4), "b": flags(0.6)})
    record(r / "4", "k4", "linear", 1, {"a": flags(0.6), "b": flags(0.8)})
    record(r / "5", "k4", "linear", 1, {"a": flags(0.0), "b": flags(0.0)}, finished="2025-01-01T00:00:00")  # older
    record(r / "6", "k5", "linear", 2, {"a": flags(1.0), "b": flags(1.0)}, status="failed")  # failed: ignored
    return r


def test_leaderboard_by_hand(runs, tmp_path):
    overall, per_subtask = build(read_jobs([runs]))
    linear = overall[overall.method == "linear"].iloc[0]
    # seed 0: macro 0.5; seed 1: macro 0.7 (the newer record of k4) -> mean 0.6
    assert linear["mean"] == pytest.approx(0.6) and linear["seeds"] == 2 and linear["n"] == 2 * N
    assert linear["std_seeds"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert linear["ci_low"] < 0.6 < linear["ci_high"] and 0 < linear["ci_high"] - linear["ci_low"] < 0.7
    assert linear["best_single"] == pytest.approx(0.6) and linear["normalized"] == pytest.approx(1.0)
    assert linear["fit_seconds"] == 1.0 and linear["trained_params"] == 7
    assert linear["command"].startswith("python -m bench method=linear task=t profile=p experts=pool")
    single_y = overall[(overall.method == "single") & (overall.variant == "expert=y")].iloc[0]
    assert single_y["normalized"] == pytest.approx(0.2 / 0.6)
    assert single_y["p_vs_reference"] < 0.05 and not single_y["tied_with_best"]  # 0.2 vs 0.6 on 20 examples
    assert bool(linear["tied_with_best"])
    a = per_subtask[(per_subtask.method == "linear") & (per_subtask.subtask == "a")].iloc[0]
    assert a["mean"] == pytest.approx(0.5) and a["n"] == N
    write([runs], tmp_path / "out", plots=True)
    assert (tmp_path / "out" / "leaderboard.md").read_text().count("| linear ") == 1
    names = sorted(p.name for p in (tmp_path / "out" / "plots").iterdir())
    assert len(names) == 2 and names[0].endswith("_cost.png") and names[1].endswith("_rank.png")


def test_runs_that_differ_in_what_is_measured_are_separate_rows(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "linear", 0, {"a": flags(0.5, 2)}, limit=2)
    record(r / "2", "k2", "linear", 0, {"a": flags(0.5, 4)}, limit=4)
    overall, _ = build(read_jobs([r]))
    assert sorted(overall["limit"]) == [2, 4] and set(overall["seeds"]) == {1}


def test_jobs_scored_on_other_examples_are_left_out_not_averaged(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "linear", 0, {"a": flags(0.5)})
    record(r / "2", "k2", "linear", 1, {"a": flags(0.5)}, inputs="other question ")
    left_out: list[tuple[str, str]] = []
    overall, _ = build(read_jobs([r]), left_out)
    assert overall.iloc[0]["seeds"] == 1
    assert left_out == [(str(r / "2" / "record.json"), "eval examples differ from the other jobs of its setting")]


def test_in_domain_rows_are_normalized_by_each_subtasks_own_expert(tmp_path):
    r = tmp_path / "runs"
    record(r / "1", "k1", "single", 0, {"a": flags(0.5), "b": flags(0.2)}, variant="expert=a")
    record(r / "2", "k2", "single", 0, {"a": flags(0.1), "b": flags(0.8)}, variant="expert=b")
    record(r / "3", "k3", "mole", 0, {"a": flags(0.3), "b": flags(0.6)})
    overall, per_subtask = build(read_jobs([r]))
    mole = overall[overall.method == "mole"].iloc[0]
    assert mole["normalized_own"] == pytest.approx((0.3 / 0.5 + 0.6 / 0.8) / 2)
    assert mole["normalized"] == pytest.approx(0.45 / 0.45)
    own = per_subtask.set_index(["method", "variant", "subtask"])["own_expert"]
    assert own[("mole", "", "a")] == 0.5 and own[("mole", "", "b")] == 0.8


def test_cross_task_rows_have_no_own_expert_normalization(runs):
    overall, _ = build(read_jobs([runs]))  # subtasks a, b; experts x, y: no subtask has its own expert
    assert overall["normalized_own"].isna().all()


def test_published_records_rebuild_the_tables_byte_for_byte(runs, tmp_path, capsys):
    published = tmp_path / "published"
    jobs = [p for p in publish([runs], published) if p.parent.name != "examples"]
    assert len(jobs) == 4  # the newest ok record of each job
    main(["--runs-dir", str(published), "--out", str(tmp_path / "a"), "--no-plots"])
    main(["--runs-dir", str(published), "--out", str(tmp_path / "b"), "--no-plots"])
    assert "read 4 job(s)" in capsys.readouterr().out
    for name in ("leaderboard.csv", "leaderboard_subtasks.csv", "leaderboard.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    from_runs = tmp_path / "c"
    main(["--runs-dir", str(runs), "--out", str(from_runs), "--no-plots"])
    assert (from_runs / "leaderboard.csv").read_bytes() == (tmp_path / "a" / "leaderboard.csv").read_bytes()


def test_cost_plot_labels_neither_overlap_nor_leave_the_axes():
    """Crowded points (several at one cost and nearly one score) still get every label, apart and inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.analysis.leaderboard import place_labels

    rng = np.random.default_rng(0)
    xs = np.concatenate([np.full(8, 3.0), rng.uniform(1, 30, 12)])
    ys = np.concatenate([0.30 + 0.002 * np.arange(8), rng.uniform(0, 0.35, 12)])
    labels = [f"method_{i}[variant={i}]" for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs, ys)
    ax.set_xscale("symlog")
    fig.tight_layout()
    texts = place_labels(ax, xs, ys, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = ax.get_window_extent(renderer)
    assert sorted(t.get_text() for t in texts) == sorted(labels)
    for i, a in enumerate(boxes):
        assert a.x0 >= frame.x0 and a.x1 <= frame.x1 and a.y0 >= frame.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1:])
    plt.close(fig)


def test_compact_archives_keep_every_scored_example_and_share_the_example_list(runs, tmp_path):
    """A published job keeps each example's answer and correctness per variant (no generation); its examples are
    stored once per task and shared; jobs whose variants scored different examples are kept row by row."""
    import gzip
    import json

    from bench.analysis.published import compact, expand

    published = tmp_path / "published"
    written = publish([runs], published)
    shared = [p for p in written if p.parent.name == "examples"]
    assert len(shared) == len({p.parent.parent for p in written if p.parent.name != "examples"})
    originals = {j.record["job_key"]: j.predictions for j in read_jobs([runs])}
    for job in read_jobs([published]):
        expected = [{k: v for k, v in row.items() if k != "generation"} for row in originals[job.record["job_key"]]]
        assert sorted(job.predictions, key=json.dumps) == sorted(expected, key=json.dumps)
        payload = json.loads(gzip.decompress(Path(job.source).read_bytes()))
        assert "generation" not in json.dumps(payload["predictions"])
    rows = [{"variant": v, "subtask": "a", "input": str(i), "target": "x", "answer": "x", "correct": 1.0}
            for v in ("p", "q") for i in range(3)]
    examples, columns = compact(rows)
    assert expand(columns, examples) == rows
    assert compact(rows[:-1]) is None  # variant q scored 2 of the 3 examples: not expressible, kept as rows
    assert compact([{**rows[0], "clip_t": 0.3}]) is None  # a score beyond correctness: kept as rows


def test_a_units_fit_info_is_stored_once_and_read_back_whole(tmp_path):
    """An in-domain job scores one fitted composition on every subtask: its rows repeat the unit's fit_info, which
    the published file holds once; reading it back gives the record exactly."""
    import gzip

    from bench.analysis.published import SAME_AS, restore_fit_info, shared_fit_info

    r = tmp_path / "runs"
    record(r / "1", "k1", "cat", 0, {"a": flags(0.5), "b": flags(0.7), "c": flags(0.2)})
    path = r / "1" / "record.json"
    data = json.loads(path.read_text())
    weights = {f"layers.{i}.q": {"e1": 0.1 * i, "e2": 1 - 0.1 * i} for i in range(200)}
    for row in data["rows"]:
        row.update(unit="a+b+c", fit_info={"weights": weights, "loss": 0.5})
    data["rows"][1]["fit_info"] = {"weights": weights, "loss": 0.25}  # a row whose info differs keeps its own
    path.write_text(json.dumps(data))
    published = tmp_path / "published"
    [file] = [p for p in publish([r], published) if p.parent.name != "examples"]
    stored = json.loads(gzip.decompress(file.read_bytes()))["record"]["rows"]
    assert [row["fit_info"] for row in stored][2:] == [{SAME_AS: 0}, {SAME_AS: 0}]
    assert stored[1]["fit_info"]["loss"] == 0.25 and stored[0]["fit_info"]["weights"] == weights
    [job] = read_jobs([published])
    assert job.record["rows"] == data["rows"]
    other = [{"unit": "x", "fit_info": {"w": 1}}, {"unit": "y", "fit_info": {"w": 1}}]  # other units: not shared
    assert shared_fit_info(other) == other and restore_fit_info(other) == other


def test_an_example_the_data_holds_twice_is_scored_twice(tmp_path):
    """BBH's sports_understanding holds two examples twice: each copy is a scored example, none is dropped."""
    r = tmp_path / "runs"
    for i, (key, seed, first, second) in enumerate([("k1", 0, 1, 0), ("k2", 1, 1, 1)]):
        record(r / str(i), key, "linear", seed, {"a": [first, second, 1]})
        preds = [json.loads(line) for line in (r / str(i) / "predictions.jsonl").read_text().splitlines()]
        preds[1]["input"] = preds[0]["input"]  # examples 0 and 1 are the same question
        (r / str(i) / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    left_out = []
    overall, _ = build(read_jobs([r]), left_out)
    assert left_out == []
    row = overall.iloc[0]
    assert row["n"] == 3 and row["mean"] == pytest.approx((2 / 3 + 1) / 2)


def test_a_method_run_at_several_budgets_gets_a_budget_curve(tmp_path):
    """Jobs of one method at steps 20 and 80 (two configs of one setting): one curve row per budget, with the
    leaderboard row's mean and CI; a method seen at one budget gets none; the plot is written."""
    from bench.analysis.budget import budget_of

    r = tmp_path / "runs"
    for i, (method, params, seed, score) in enumerate([
            ("mole", {"steps": 20, "lr": 0.001}, 0, 0.2), ("mole", {"steps": 20, "lr": 0.001}, 1, 0.4),
            ("mole", {"steps": 80, "lr": 0.001}, 0, 0.6), ("lorahub", {"budget": 40}, 0, 0.5)]):
        record(r / str(i), f"k{i}", method, seed, {"a": flags(score), "b": flags(score)})
        path = r / str(i) / "record.json"
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "method_params": params}))
    out = tmp_path / "out"
    overall, _ = write([r], out)
    curve = pd.read_csv(out / "budget_curves.csv")
    assert list(curve["method"]) == ["mole", "mole"] and list(curve["budget"]) == [20, 80]
    assert list(curve["budget_key"]) == ["steps", "steps"] and set(curve["subtasks"]) == {"a b"}  # the fold
    assert curve["mean"].tolist() == pytest.approx([0.3, 0.6])
    mole = overall[overall.method == "mole"].set_index("config")
    for _, row in curve.iterrows():
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(mole.loc[row["config"], ["ci_low", "ci_high"]]))
    assert len(list((out / "plots").glob("*_budget.png"))) == 1
    # the two MoLE rows are told apart by what differs between their configs; LoraHub's one config needs no label
    assert sorted(overall[overall.method == "mole"]["options"]) == ["steps=20", "steps=80"]
    assert overall[overall.method == "lorahub"]["options"].tolist() == [""]
    table = (out / "leaderboard.md").read_text()
    assert re.search(r"\| mole +\| steps=20 +\|", table) and re.search(r"\| mole +\| steps=80 +\|", table)
    assert budget_of({"steps": None, "budget": 40}) == ("budget", 40) and budget_of({"lr": 1}) is None


def test_per_task_wins_count_each_subtasks_best_and_the_rows_tied_with_it(tmp_path):
    r = tmp_path / "runs"
    n = 40
    record(r / "1", "k1", "a_first", 0, {"a": flags(0.9, n), "b": flags(0.1, n)})
    record(r / "2", "k2", "b_first", 0, {"a": flags(0.1, n), "b": flags(0.9, n)})
    # the same answers as a_first on "a" (an exact tie: both best), 34 vs 36 of 40 on "b" (not significantly below)
    record(r / "3", "k3", "close", 0, {"a": flags(0.9, n), "b": flags(0.85, n)})
    overall, per_subtask = build(read_jobs([r]))
    wins = overall.set_index("method")[["subtasks_best", "subtasks_tied"]]
    assert wins.loc["a_first"].tolist() == [1, 1]  # 4 of 40 on "b" against 36: significantly below
    assert wins.loc["b_first"].tolist() == [1, 1]
    assert wins.loc["close"].tolist() == [1, 2]
    b = per_subtask[per_subtask.subtask == "b"].set_index("method")
    assert b.loc["b_first", "p_vs_best"] is None or pd.isna(b.loc["b_first", "p_vs_best"])
    assert b.loc["close", "p_vs_best"] >= 0.05 > b.loc["a_first", "p_vs_best"]


def test_option_labels_name_only_the_parameters_in_which_a_methods_configs_differ():
    from bench.analysis.settings import option_labels
    from bench.analysis.tables import row_label

    labels = option_labels({"c1": {"lambda": 1.0, "normalize": False, "vl": {"steps": 10, "lr": 0.1}},
                            "c2": {"lambda": 1.0, "normalize": True, "vl": {"steps": 20, "lr": 0.1}},
                            "c3": {"lambda": 1.0, "vl": {"steps": 10, "lr": 0.1}}})
    assert labels == {"c1": "normalize=False, vl.steps=10", "c2": "normalize=True, vl.steps=20",
                      "c3": "normalize=default, vl.steps=10"}  # c3 predates `normalize`: its default ran
    assert option_labels({"c1": {"lambda": 1.0}}) == {"c1": ""}
    assert row_label("mole", "", "steps=20") == "mole (steps=20)" and row_label("single", "expert=a") == "single[expert=a]"


def test_rows_say_which_hardware_their_costs_were_measured_on(tmp_path):
    r = tmp_path / "runs"
    for name, seed, extra in [("gpu", 0, {"hardware": "NVIDIA H200", "device": "cuda"}), ("old", 1, {"device": "cpu"}),
                              ("none", 2, {})]:
        record(r / name, name, "linear", seed, {"a": flags(0.5)})
        path = r / name / "record.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    overall, _ = build(read_jobs([r]))
    assert overall["hardware"].tolist() == ["NVIDIA H200; cpu"]
