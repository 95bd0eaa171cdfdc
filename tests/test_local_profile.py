"""Slow checks on the real local profile (SmolLM2-135M-Instruct on CPU; run in CI): the committed expert
pools' manifest claims hold on a slice, and one committed leaderboard cell reproduces exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from bench.config import CONF_DIR, PROJECT_ROOT, register_resolvers
from bench.experts.pools import load_pool, manifest_scores
from bench.registry import make_task
from bench.run.runner import load_model, run

pytestmark = pytest.mark.slow
register_resolvers()
SLICE = 12


def local_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["profile=local", "device=cpu", *overrides])


@pytest.fixture(scope="module")
def lm():
    return load_model(local_cfg())


@pytest.mark.parametrize("pool", ["local_algorithmic", "local_flan_cot"])
def test_manifest_claim_holds_on_a_slice(lm, pool):
    """The expert with the largest claimed gain over the base model keeps at least half of that gain on the
    first examples of its own task's eval split (scored as the manifest was)."""
    cfg = local_cfg(f"experts={pool}")
    if cfg.experts.train.task != "algorithmic" and not cfg.paths.data_root:
        pytest.skip(f"{pool} is scored on {cfg.experts.train.task} data: no data root (BENCH_DATA_ROOT or ../shared/data)")
    manifest = json.loads((Path(cfg.experts.dir) / "manifest.json").read_text())
    claim = max(manifest["experts"], key=lambda e: e["expert_score"] - e["base_score"])
    experts = load_pool(cfg.experts, lm, cfg.paths.data_root, train_if_missing=False).subset([claim["name"]])
    task = make_task(cfg.experts.train.task, cfg.experts.train.task_cfg, cfg.paths.data_root)
    scores = manifest_scores(lm, task, experts[0], SLICE)
    gain = scores["expert_score"] - scores["base_score"]
    assert gain >= (claim["expert_score"] - claim["base_score"]) / 2, (claim, scores)


def test_a_committed_leaderboard_cell_reproduces(tmp_path):
    """`method=linear task=algorithmic profile=local` (seed-free) gives the committed per-subtask scores."""
    committed = pd.read_csv(PROJECT_ROOT / "results" / "leaderboard_subtasks.csv")
    cell = committed[(committed.profile == "local") & (committed.task == "algorithmic") & (committed.method == "linear")]
    assert len(cell) == 5
    record = run(local_cfg("method=linear", "task=algorithmic", f"paths.runs_dir={tmp_path}"), tmp_path / "job")
    scores = {r["subtask"]: r["value"] for r in record["rows"] if r["subtask"] != "all"}
    assert scores == pytest.approx(dict(zip(cell["subtask"], cell["mean"])), abs=1e-9)
