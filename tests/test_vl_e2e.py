"""End to end on the smoke V&L stack: the CLI (`method=lora_switch task=dreambooth profile=smoke_vl`) trains the tiny
subject pool if needed, composes, generates and scores, and writes images, a contact sheet, a record and
leaderboard rows, on CPU in well under a minute; and the pool cache is reused, validated and refused when bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.errors import AdapterError
from conftest import CONF, DATA_ROOT
from test_vl_common import run_vl_job, tiny_sd

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "dreambooth").is_dir(), reason="needs ../shared/data/dreambooth")
# what profile=smoke_vl selects, spelled out (harmless if the profile already sets them)
SMOKE_VL = ["model=tiny_sd", "experts=smoke_dreambooth", "task.subtasks=[dog6+wolf_plushie+backpack]",
            "task.clip.model=tiny", "task.n_images=1", "task.num_inference_steps=10", "task.limit=2"]


def test_cli_lora_switch_dreambooth_smoke(tmp_path):
    from bench.analysis.leaderboard import build
    from bench.analysis.published import read_jobs

    runs = tmp_path / "runs"
    record, job = run_vl_job("lora_switch", runs, *SMOKE_VL, timeout=300)
    assert record["status"] == "ok" and record["domain"] == "vl" and record["meaningful"] is False
    assert record["experts"] == ["dog6", "wolf_plushie", "backpack"]
    metrics = {(r["subtask"], r["metric"]) for r in record["rows"]}
    assert {("dog6+wolf_plushie+backpack", m) for m in ("clip_t", "clip_i", "clip_i/dog6")} <= metrics
    images = sorted((job / "images").rglob("*.png"))
    assert len(images) == 2 and (job / "contact-dog6+wolf_plushie+backpack-default.png").is_file()
    predictions = [json.loads(line) for line in (job / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and predictions[0]["scorer"] == "tiny-random (meaningless)"
    assert (job / predictions[0]["image"]).is_file()
    overall, per_subtask = build(read_jobs([runs]))
    assert set(overall["method"]) == {"lora_switch"} and {"clip_t", "clip_i"} <= set(overall["metric"])
    assert (overall["ci_low"] <= overall["mean"]).all() and (overall["mean"] <= overall["ci_high"]).all()


def experts_cfg(tmp_path, **train):
    cfg = OmegaConf.load(CONF / "experts" / "smoke_dreambooth.yaml")
    cfg.dir = str(tmp_path / "pool")
    cfg.subjects = ["dog6", "backpack"]
    cfg.train = OmegaConf.merge(cfg.train, {"steps": 2, **train})
    return cfg


def test_subject_pool_trains_once_and_is_validated(tmp_path):
    from bench.experts.vl import load_subject_pool

    model = tiny_sd()
    cfg = experts_cfg(tmp_path, prior_preservation=True)
    with pytest.raises(AdapterError, match="not trained yet"):
        load_subject_pool(cfg, model, str(DATA_ROOT), train_if_missing=False)
    pool = load_subject_pool(cfg, model, str(DATA_ROOT))
    assert pool.names == ["dog6", "backpack"] and pool.base_model == model.model_id
    manifest = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    assert manifest["subjects"]["dog6"]["token"] == "izz" and manifest["subjects"]["backpack"]["class"] == "backpack"
    assert len(list((tmp_path / "pool" / "_class_images" / "dog").glob("*.png"))) == 2
    assert pool[0].metadata["token"] == "izz" and pool[0].modules[pool.module_names[0]].B.abs().max() > 0
    stamp = (tmp_path / "pool" / "dog6" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    load_subject_pool(cfg, model, str(DATA_ROOT), train_if_missing=False)  # complete: nothing retrained
    assert (tmp_path / "pool" / "dog6" / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(AdapterError, match="another training config"):
        load_subject_pool(experts_cfg(tmp_path, prior_preservation=True, rank=2), model, str(DATA_ROOT), False)
    # the files load in a stock diffusers pipeline too
    model.pipe.load_lora_weights(str(tmp_path / "pool" / "dog6"), adapter_name="dog6")
    model.pipe.unload_lora_weights()


def test_subject_pool_bad_inputs(tmp_path):
    from bench.errors import DataError
    from bench.experts.vl import load_subject_pool

    model = tiny_sd()
    cfg = experts_cfg(tmp_path)
    cfg.subjects = ["dog6", "unicorn"]
    with pytest.raises(DataError, match="unknown DreamBooth subject 'unicorn'"):
        load_subject_pool(cfg, model, str(DATA_ROOT))
    with pytest.raises(DataError, match="data_root"):
        load_subject_pool(experts_cfg(tmp_path), model, None)
    cfg = experts_cfg(tmp_path, targets=["no_such_layer"])
    with pytest.raises(Exception, match="match no linear layer"):
        load_subject_pool(cfg, model, str(DATA_ROOT))
    # a LoRA file of another base model in the pool folder is refused on load
    good = experts_cfg(tmp_path / "g")
    load_subject_pool(good, model, str(DATA_ROOT))
    sidecar = Path(good.dir) / "backpack" / "bench_adapter.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "base_model": "stabilityai/sdxl-base"}))
    with pytest.raises(AdapterError, match="trained on base model 'stabilityai/sdxl-base'"):
        load_subject_pool(good, model, str(DATA_ROOT))
