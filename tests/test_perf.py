"""The performance benchmarks run end to end at tiny sizes on CPU (no timing asserted: only that each writes its
table, and that the checks they run before timing hold) — they are run for real on a GPU machine whose image
differs from this one, so a broken code path should show up here first."""

from __future__ import annotations

import json

import pytest

from bench.perf import common
from bench.perf.__main__ import available, main


@pytest.fixture(autouse=True)
def perf_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    return tmp_path


def result(perf_dir, name: str) -> dict:
    return json.loads((perf_dir / f"{name}-cpu.json").read_text())


def test_every_benchmark_is_listed():
    assert {"merge", "lego", "gated", "lorahub", "composite", "eval"} <= set(available())


def test_merge_benchmark_and_its_stage_profile(perf_dir):
    small = ["--device", "cpu", "--n", "2", "--layers", "1", "--d", "32", "--ffn", "48", "--rank", "4"]
    main(["merge", *small, "--fused", "off"])
    rows = result(perf_dir, "merge")["rows"]
    assert {r["op"] for r in rows} == {"fold_linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd",
                                       "knots", "core_space", "tsv", "iso_c", "iso_cts", "wudi", "della", "breadcrumbs"}
    assert all(r["median_s"] > 0 and r["result"] in ("", "n/a (CPU)") for r in rows)
    main(["merge", *small, "--stages"])
    assert len(result(perf_dir, "merge_stages")["rows"]) >= 8


def test_gated_benchmark_variants_agree_with_the_loop(perf_dir):
    main(["gated", "--device", "cpu", "--d", "64", "--experts", "2,3", "--tokens", "5", "--warmup", "1", "--repeat", "2"])
    rows = result(perf_dir, "gated")["rows"]
    assert len(rows) == 2 and all(r["max_rel_err"] < 1e-5 for r in rows)  # float32 on CPU


def test_lego_benchmark(perf_dir):
    main(["lego", "--device", "cpu", "--n", "2", "--layers", "1", "--d", "32", "--ffn", "48", "--rank", "4"])
    assert {r["op"] for r in result(perf_dir, "lego")["rows"]} == {"cluster", "merge"}


def test_lorahub_benchmark(perf_dir):
    main(["lorahub", "--quick", "--device", "cpu", "--d", "32", "--ffn", "64", "--blocks", "1", "--vocab", "64",
          "--seq", "8", "--n", "3", "--rank", "4", "--budget", "4", "--repeat", "1"])
    assert result(perf_dir, "lorahub")["rows"]


def test_composite_benchmark(perf_dir):
    main(["composite", "--quick", "--device", "cpu", "--ns", "2", "--steps", "1", "--repeat", "1", "--warmup", "0"])
    assert result(perf_dir, "composite")["rows"]


@pytest.mark.skipif(not (common.Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh").is_dir(),
                    reason="needs the BBH data of ../shared/data")
def test_eval_benchmark_quick(perf_dir):
    """Every method through both generation paths on BBH prompts (tiny model, CPU): the same generations (fp32),
    and lm-eval's HF backend as the peer row."""
    main(["eval", "--quick", "--device", "cpu", "--limit", "12"])
    rows = result(perf_dir, "eval")["rows"]
    ours = [r for r in rows if r["path"] == "new"]
    assert {r["method"] for r in ours} == {"base", "linear_folded", "linear_peft", "mole", "lora_flow", "moa",
                                            "lora_switch", "lora_composite"}
    assert all(r["differ"] == 0 and r["examples_per_s"] > 0 and r["x_old"] > 0 for r in ours)
    assert any(r["path"] == "lm-eval HFLM" and r.get("examples_per_s") for r in rows)
