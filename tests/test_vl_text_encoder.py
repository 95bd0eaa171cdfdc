"""Diffusion LoRA Switch / LoRA Composite with experts that also target the text encoder (``method.text_encoder``),
and Composite's prediction against per-expert references for N = 3.

References are written here from the definitions, not through the code under test: text embeddings from a copy of
the text encoder with ``W + Σ_i c_i · s_i B_i A_i`` folded into its weights (and, for the official mode, from the
stock diffusers pipeline driven the way the official Multi-LoRA-Composition scripts drive it: ``set_adapters`` then
``encode_prompt(lora_scale=...)``); UNet predictions from a copy of the UNet with one expert's delta folded in.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.diffusers_lora import save_diffusers_lora
from conftest import CONF
from methods.base import FitContext
from methods.lora_composite import CompositeHooks, LoraComposite
from methods.lora_switch import LoraSwitch, SwitchHooks
from test_vl_common import random_sd_pool, tiny_sd

SCALE = 0.8
PROMPTS, NEGATIVE = ["a photo of a dog", "a red clock on a table"], ["", "blurry"]
METHODS = {"lora_switch": LoraSwitch, "lora_composite": LoraComposite}


def ctx_for(model, pool):
    return FitContext(model=model, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input, score=None)


def folded_copy(module: torch.nn.Module, component: str, adapters, coefs) -> torch.nn.Module:
    """A deep copy of `module` (the model's `component`) with ``W += Σ_j c_j · s B A`` for every adapter's layers of
    that component."""
    out = copy.deepcopy(module)
    prefix = component + "."
    with torch.no_grad():
        for adapter, c in zip(adapters, coefs):
            for path, m in adapter.modules.items():
                if path.startswith(prefix):
                    layer = out.get_submodule(path[len(prefix):])
                    delta = c * m.scale * (m.B.double() @ m.A.double())
                    layer.weight += delta.to(layer.weight.dtype)
    return out


def reference_embeddings(model, text_encoder) -> torch.Tensor:
    """``[uncond; cond]`` as SD 1.x's encode_prompt makes it (max-length padding, last hidden state, no mask)."""
    tok = model.tokenizer

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return text_encoder(ids.to(model.device))[0]

    return torch.cat([encode(NEGATIVE), encode(PROMPTS)])


def hooks_of(method: str, cfg_overrides: dict, model, pool):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{method}.yaml"), cfg_overrides)
    gen = METHODS[method](cfg).compose(ctx_for(model, pool))
    composed = next(gen)
    return gen, composed


# ----------------------------------------------------------------------------- the text encoder


@pytest.fixture(scope="module")
def te_setup():
    model = tiny_sd("float64")
    pool = random_sd_pool(model, 3, text_encoder=True)
    assert any(k.startswith("text_encoder.") for k in pool[0].modules)
    refs = {  # name -> the [uncond; cond] embedding with those coefficients folded into the text encoder
        "e0": [1, 0, 0], "e1": [0, 1, 0], "e2": [0, 0, 1], "all": [1, 1, 1],
    }
    refs = {k: reference_embeddings(model, folded_copy(model.text_encoder, "text_encoder", list(pool),
                                                       [SCALE * c for c in v])) for k, v in refs.items()}
    return model, pool, refs


EXPECTED = {  # (method, text_encoder) -> the reference each expert's slot must hold
    ("lora_switch", "official"): ["e0", "e0", "e0"],
    ("lora_composite", "official"): ["all", "all", "all"],
    ("lora_switch", "per_expert"): ["e0", "e1", "e2"],
    ("lora_composite", "per_expert"): ["e0", "e1", "e2"],
}


@pytest.mark.parametrize("method,mode", sorted(EXPECTED))
def test_embeddings_of_each_mode_equal_the_folded_text_encoder(te_setup, method, mode):
    model, pool, refs = te_setup
    overrides = {"lora_scale": SCALE} if mode == "official" else {"lora_scale": SCALE, "text_encoder": mode}
    gen, composed = hooks_of(method, overrides, model, pool)  # the default is the official mode
    try:
        assert composed.report.info["text_encoder"] == mode
        embeds = composed.model.hooks.embed(model, PROMPTS, NEGATIVE, True)
    finally:
        gen.close()
    assert len(embeds) == 3
    for got, name in zip(embeds, EXPECTED[method, mode]):
        ref = refs[name]
        assert got.shape == ref.shape == (4, model.tokenizer.model_max_length, 32)
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), (method, mode, name)
    # the references really differ: one expert vs another vs all of them at once
    assert min((refs[a] - refs[b]).abs().max() for a in refs for b in refs if a < b) > 1e-3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_official_embedding_equals_the_stock_diffusers_pipeline(te_setup, tmp_path, method):
    """The official scripts: ``pipeline.set_adapters([first])`` (Switch) or ``set_adapters(all)`` (Composite), then
    the pipeline's single ``encode_prompt`` with ``lora_scale = cross_attention_kwargs["scale"]``."""
    model, pool, _ = te_setup
    assert "_lora_scale" not in vars(model.pipe)
    gen, composed = hooks_of(method, {"lora_scale": SCALE}, model, pool)
    try:
        ours = composed.model.hooks.embed(model, PROMPTS, NEGATIVE, True)
    finally:
        gen.close()
    names = pool.names
    for adapter in pool:
        model.pipe.load_lora_weights(str(save_diffusers_lora(adapter, tmp_path / adapter.name)),
                                     adapter_name=adapter.name)
    try:
        model.pipe.set_adapters(names[:1] if method == "lora_switch" else names)
        cond, uncond = model.pipe.encode_prompt(PROMPTS, model.device, 1, True, negative_prompt=NEGATIVE,
                                                lora_scale=SCALE)
    finally:
        model.pipe.unload_lora_weights()
        # encode_prompt(lora_scale=...) leaves pipe._lora_scale behind, and diffusers scales the text-encoder LoRA
        # of every later load_lora_weights by it: put the shared pipeline back as it was
        vars(model.pipe).pop("_lora_scale", None)
    ref = torch.cat([uncond, cond])
    assert all(torch.allclose(e, ref, rtol=1e-10, atol=1e-12) for e in ours)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.components.modules())  # the shared model is clean


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_two_modes_sample_different_images(te_setup, method):
    model, pool, _ = te_setup
    noise = model.initial_noise(1, 5)
    latents = {}
    for mode in ("official", "per_expert"):
        gen, composed = hooks_of(method, {"lora_scale": SCALE, "text_encoder": mode, "tau": 1}, model, pool)
        try:
            hooks = composed.model.hooks
            embeds = hooks.embed(model, PROMPTS[:1], NEGATIVE[:1], True)
            latents[mode] = model.sample(noise, embeds, 3, 7.5, hooks)
        finally:
            gen.close()
    assert (latents["official"] - latents["per_expert"]).abs().max() > 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
def test_text_encoder_option_is_validated(method):
    cfg = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    assert cfg.text_encoder == "official"
    with pytest.raises(ConfigError, match=r"method\.text_encoder='both'.*official.*per_expert"):
        METHODS[method](OmegaConf.merge(cfg, {"text_encoder": "both"}))
    hooks = SwitchHooks if method == "lora_switch" else CompositeHooks
    with pytest.raises(ConfigError, match="text_encoder"):
        hooks(None, *((1, SCALE) if method == "lora_switch" else (SCALE, True)), text_encoder="shared")


# ----------------------------------------------------------------------------- Composite vs per-expert references


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "serial"])
def test_composite_noise_is_the_mean_of_per_expert_predictions(batched):
    """N = 3, float64: the Composite prediction equals the mean over experts of a UNet with expert i's delta
    (lora_scale · s_i B_i A_i) folded into a copy of its weights, run on expert i's own conditioning."""
    model = tiny_sd("float64")
    n = 3
    pool = random_sd_pool(model, n, text_encoder=True)
    unets = [folded_copy(model.unet, "unet", [pool[i]], [SCALE]) for i in range(n)]
    g = torch.Generator().manual_seed(11)
    rows = 4  # guidance batch [uncond; cond] of two prompts
    latents = torch.randn(rows, *model.latent_shape, generator=g, dtype=torch.float64)
    embeds = [torch.randn(rows, 77, 32, generator=g, dtype=torch.float64) for _ in range(n)]  # distinct per expert
    t = torch.tensor(601.0, dtype=torch.float64)
    with torch.no_grad():
        refs = [u(latents, t, encoder_hidden_states=e, return_dict=False)[0] for u, e in zip(unets, embeds)]
        base = model.unet(latents, t, encoder_hidden_states=embeds[0], return_dict=False)[0]
    ref = torch.stack(refs).mean(0)
    with model.experts_applied(pool) as mix, torch.no_grad():
        got = CompositeHooks(mix, SCALE, batched, "per_expert").noise(model, latents, t, 0, embeds)
        assert mix.single is None and mix.weights is None  # left off
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 1e-10, rel
    # the check can tell: each expert's own prediction, and the base, are far from the mean
    assert min((r - ref).abs().max() for r in refs) / ref.abs().max() > 1e-3
    assert (base - ref).abs().max() / ref.abs().max() > 1e-3
