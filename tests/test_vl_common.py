"""Helpers shared by the V&L tests (no tests here): the tiny SD, random subject LoRAs, task/scorer configs."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from conftest import CACHE, CONF, DATA_ROOT

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "v_proj")


@lru_cache(maxsize=2)
def tiny_sd(dtype: str = "float32"):
    """The smoke profile's tiny Stable Diffusion on CPU (float64 for exact comparisons)."""
    from bench.models.diffusion import load_diffusion_model

    cfg = OmegaConf.load(CONF / "model" / "tiny_sd.yaml")
    cfg.dtype = dtype
    return load_diffusion_model(cfg, CACHE, device="cpu")


def random_sd_adapter(model, name: str, seed: int, rank: int = 4, alpha: float = 6.0, text_encoder: bool = False,
                      base: str | None = None, ranks: dict | None = None) -> LoraAdapter:
    """Random non-zero LoRA on the UNet attention projections (and the text encoder's q/v when asked)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, layer in model.components.named_modules():
        rest = path.partition(".")[2]
        unet = path.startswith("unet.") and rest.endswith(UNET_TARGETS)
        te = text_encoder and path.startswith("text_encoder.") and rest.endswith(TE_TARGETS)
        if isinstance(layer, torch.nn.Linear) and (unet or te):
            r = (ranks or {}).get(rest.rsplit(".", 1)[-1], rank)
            A = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.4
            B = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.4
            modules[path] = LoraModule(A.to(model.dtype), B.to(model.dtype), alpha / r)
    return LoraAdapter(name, base or model.model_id, modules, task_type=None)


def random_sd_pool(model, n: int, text_encoder: bool = False, names=None) -> ExpertPool:
    names = names or [f"e{i}" for i in range(n)]
    return ExpertPool(model.model_id, [random_sd_adapter(model, nm, i, text_encoder=text_encoder)
                                       for i, nm in enumerate(names)])


def tiny_clip_cfg():
    cfg = OmegaConf.load(CONF / "task" / "dreambooth.yaml").clip
    cfg.model, cfg.cache_dir, cfg.device = "tiny", str(CACHE), "cpu"
    return cfg


def task_cfg(**overrides):
    """The dreambooth task config with the tiny scorer and small generation settings."""
    cfg = OmegaConf.load(CONF / "task" / "dreambooth.yaml")
    cfg.subtasks, cfg.limit, cfg.n_images, cfg.num_inference_steps = None, 2, 1, 4
    cfg.clip = tiny_clip_cfg()
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def images_array(images) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float64) for im in images]))


__all__ = ["tiny_sd", "random_sd_adapter", "random_sd_pool", "tiny_clip_cfg", "task_cfg", "DATA_ROOT", "images_array"]


def run_vl_job(method: str, runs: Path, *overrides: str, timeout: int = 600) -> tuple[dict, Path]:
    """One `python -m bench method=<method> task=dreambooth profile=smoke_vl` job into `runs` (it must succeed):
    its record and its folder."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    argv = [sys.executable, "-m", "bench", f"method={method}", "task=dreambooth", "profile=smoke_vl",
            f"paths.runs_dir={runs}", f"paths.cache_dir={CACHE}", f"paths.data_root={DATA_ROOT}", *overrides]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record_path,) = runs.rglob("record.json")
    return json.loads(record_path.read_text()), record_path.parent
