"""K-LoRA (`methods/k_lora.py`) against a reference written here from the official code (HVision-NKU/K-LoRA at
893d0f9: klora.py ``get_klora_weight``, utils.py ``get_ratio_between_content_and_style``, inference_sd.py defaults):
every K-LoRA layer call of a sampling run on the tiny pipeline applies exactly the LoRA the reference selects, and
its output is ``W x + s · B_sel A_sel x``; config errors name their key; the CLI smoke run ends ok."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from conftest import CONF, DATA_ROOT
from methods.base import FitContext
from methods.k_lora import KLora, time_scale
from test_vl_common import random_sd_adapter, run_vl_job, tiny_sd

ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")


def cfg(**overrides):
    c = OmegaConf.load(CONF / "method" / "k_lora.yaml")
    for key, value in overrides.items():
        c[key] = value
    return c


def ctx_for(model, pool):
    return FitContext(model=model, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input, score=None)


def mixed_pool(model, extra=()):
    """Subject and style of different ranks per projection (and scales alpha / r), plus `extra` experts."""
    subject = random_sd_adapter(model, "subj", 11, rank=4, alpha=6.0, ranks={"to_q": 2, "to_k": 5, "to_v": 3, "0": 6})
    style = random_sd_adapter(model, "sty", 12, rank=3, alpha=2.0, ranks={"to_q": 4, "to_v": 1, "0": 8})
    others = [random_sd_adapter(model, name, 20 + i) for i, name in enumerate(extra)]
    return ExpertPool(model.model_id, [subject, style, *others])


# ----------------------------------------------------------------------------- the reference (official code)


def ref_delta(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.B.double() @ m.A.double())  # the official ``weight_a @ weight_b`` (up @ down)


def ref_gamma(subject, style, paths) -> float:
    """utils.get_ratio_between_content_and_style."""
    ratios = [ref_delta(subject.modules[p]).abs().sum().item() / ref_delta(style.modules[p]).abs().sum().item()
              for p in paths]
    average = sum(ratios) / len(ratios)
    ratios = [r for r in ratios if r < 3 * average]
    return sum(ratios) / len(ratios) if ratios else float("inf")


def ref_choice(m1: LoraModule, m2: LoraModule, gamma, timestep, sum_timesteps, alpha, beta, pattern) -> int:
    """klora.py get_klora_weight: 0 (matrix1, the content LoRA) or 1 (matrix2, the style LoRA)."""
    k = m1.B.shape[1] * m2.B.shape[1]  # weight_1_a (up, d_out × r).shape[1] * weight_2_a.shape[1]
    time_ratio = timestep % sum_timesteps
    top_k_sum1 = torch.topk(torch.abs(ref_delta(m1)).flatten(), k)[0].sum()
    top_k_sum2 = torch.topk(torch.abs(ref_delta(m2)).flatten(), k)[0].sum()
    scale = alpha * time_ratio / sum_timesteps + beta
    if pattern == "s*":
        scale = scale % alpha
    top_k_sum1 = top_k_sum1 / gamma
    top_k_sum2 = top_k_sum2 * scale
    return 0 if top_k_sum1 / top_k_sum2 > 1 else 1


def record_calls(layers, adapters, lora_scale):
    """Forward hooks on the stacked layers: for every call, (path, which adapter's update the output carries), the
    update read as ``y − W x`` and matched against ``lora_scale · s_i B_i A_i x`` from the adapters' own factors."""
    calls, handles = [], []

    def hook(layer, inputs, output):
        x = inputs[0]
        update = output - layer.base(x)
        errors = []
        for adapter in adapters:
            m = adapter.modules[layer.path]
            expected = lora_scale * m.scale * (x @ m.A.double().T @ m.B.double().T)
            errors.append(((update - expected).abs().max() / expected.abs().max()).item())
        used = min(range(len(errors)), key=errors.__getitem__)
        assert errors[used] < 1e-10, errors  # y = W x + s · B_sel A_sel x ...
        assert all(e > 1e-2 for i, e in enumerate(errors) if i != used), errors  # ... and nothing of the other
        calls.append((layer.path, used))

    for layer in layers.values():
        handles.append(layer.register_forward_hook(hook))
    return calls, handles


# ----------------------------------------------------------------------------- selection on the tiny pipeline


@pytest.mark.parametrize("overrides,steps,guidance", [
    ({}, 6, 7.5),                                              # s*, alpha 1.5, beta 1.275, T = layers × steps
    ({"pattern": "s", "lora_scale": 0.8}, 5, 7.5),             # s: alpha 1.5, beta 0.5
    ({"pattern": "s", "alpha": 2.0, "beta": 0.25, "sum_timesteps": 50}, 4, 1.0),  # fixed T, wrapping; no CFG
])
def test_every_layer_call_uses_the_reference_selection(overrides, steps, guidance):
    model = tiny_sd("float64")
    pool = mixed_pool(model)
    subject, style = pool[0], pool[1]
    method = KLora(cfg(**overrides))
    gen = method.compose(ctx_for(model, pool))
    composed = next(gen)
    hooks = composed.model.hooks
    paths = [p for p in subject.modules if p.startswith("unet.") and p.endswith(ATTN)]
    assert sorted(hooks.mix.layers) == sorted(paths) and len(paths) == 32
    lora_scale = float(overrides.get("lora_scale", 1.0))
    calls, handles = record_calls(hooks.mix.layers, [subject, style], lora_scale)
    try:
        composed.generate(["a photo of a dog"], n_images=2, seed=3, num_inference_steps=steps,
                          guidance_scale=guidance)
    finally:
        for h in handles:
            h.remove()
        gen.close()
    pattern = overrides.get("pattern", "s*")
    alpha = overrides.get("alpha", 1.5)
    beta = overrides.get("beta", 1.5 * 0.85 if pattern == "s*" else 0.5)
    total = overrides.get("sum_timesteps") or len(paths) * steps
    gamma = ref_gamma(subject, style, paths)
    expected = [ref_choice(subject.modules[p], style.modules[p], gamma, c, total, alpha, beta, pattern)
                for c, (p, _) in enumerate(calls, start=1)]
    assert len(calls) == len(paths) * steps and sorted({p for p, _ in calls}) == sorted(paths)
    assert [used for _, used in calls] == expected
    assert {0, 1} <= set(expected)  # both LoRAs act somewhere: the test sees the rule, not a constant
    # the method's own trace and report agree with what the layers did
    assert [(p, e) for _, p, e in hooks.trace] == calls
    info = composed.report.info
    assert info["gamma"] == pytest.approx(gamma, rel=1e-12)
    assert info["subject"] == "subj" and info["style"] == "sty" and info["dropped"] == []
    shares = [sum(1 for p, e in calls[i * 32:(i + 1) * 32] if e == 0) / 32 for i in range(steps)]
    assert info["subject_share_by_step"] == [round(s, 4) for s in shares]


def test_time_scale_follows_the_official_schedules():
    # s* (inference_sd.py default): alpha 1.5, beta 1.275, then mod alpha: 1.275 at the start, 0 at 15 %, 1.275 at T
    assert time_scale(0, 1000, 1.5, 1.275, "s*") == pytest.approx(1.275)
    assert time_scale(100, 1000, 1.5, 1.275, "s*") == pytest.approx(1.425)
    assert time_scale(200, 1000, 1.5, 1.275, "s*") == pytest.approx(0.075)
    assert time_scale(999, 1000, 1.5, 1.275, "s*") == pytest.approx(1.5 * 0.999 - 0.225)
    assert time_scale(1000, 1000, 1.5, 1.275, "s*") == pytest.approx(1.275)  # the counter wraps: c mod T = 0
    # s: linear from beta to alpha + beta (the style weighs more and more)
    assert time_scale(500, 1000, 1.5, 0.5, "s") == pytest.approx(1.25)
    assert time_scale(1500, 1000, 1.5, 0.5, "s") == pytest.approx(1.25)


# ----------------------------------------------------------------------------- pools, layers, restoring the model


def test_compose_restores_the_model_and_drops_extra_experts():
    model = tiny_sd()
    pool = mixed_pool(model, extra=("third",))
    before = dict(model.components.named_modules())
    gen = KLora(cfg(subject=2, style=0)).compose(ctx_for(model, pool))
    composed = next(gen)
    images = composed.generate(["a dog"], n_images=1, seed=0, num_inference_steps=3)
    assert len(images) == 1 and images[0].size == (model.resolution, model.resolution)
    info = composed.report.info
    assert (info["subject"], info["style"], info["dropped"]) == ("third", "subj", ["sty"])
    assert info["k_lora_layers"] == 32 and info["unused_layers"] == 0 and len(info["subject_share_by_step"]) == 3
    gen.close()
    assert all(model.components.get_submodule(n) is m for n, m in before.items())
    with pytest.raises(ConfigError, match="method.extra"):
        next(KLora(cfg(extra="error")).compose(ctx_for(model, pool)))
    with pytest.raises(ConfigError, match="method.style=5"):
        next(KLora(cfg(style=5)).compose(ctx_for(model, pool)))
    with pytest.raises(ConfigError, match="method.subject"):
        next(KLora(cfg()).compose(ctx_for(model, ExpertPool(model.model_id, [pool[0]]))))
    assert all(model.components.get_submodule(n) is m for n, m in before.items())


def with_ff_and_text_encoder(model, adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """`adapter` plus random LoRAs on the UNet feed-forward output layers and the text encoder's q_proj."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(adapter.modules)
    for path, layer in model.components.named_modules():
        if isinstance(layer, torch.nn.Linear) and path.endswith(("ff.net.2", "self_attn.q_proj")):
            modules[path] = LoraModule(torch.randn(2, layer.in_features, generator=g, dtype=torch.float64),
                                       torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64), 1.0)
    return LoraAdapter(adapter.name, adapter.base_model, modules, task_type=None)


@pytest.mark.parametrize("layers,count", [("attention", 32), ("all", 32 + 4)])
def test_which_layers_are_fused(layers, count):
    model = tiny_sd("float64")
    pool = mixed_pool(model)
    pool = ExpertPool(model.model_id, [with_ff_and_text_encoder(model, a, i) for i, a in enumerate(pool)])
    extra = sum(1 for p in pool[0].modules if not p.endswith(ATTN) or p.startswith("text_encoder."))
    assert extra == 4 + 2  # 4 ff.net.2 of the UNet, 2 text-encoder q_proj
    gen = KLora(cfg(layers=layers)).compose(ctx_for(model, pool))
    composed = next(gen)
    try:
        hooks = composed.model.hooks
        assert len(hooks.mix.layers) == count and all(p.startswith("unet.") for p in hooks.mix.layers)
        assert composed.report.info["unused_layers"] == len(pool[0].modules) - count
        te = [type(m).__name__ for _, m in model.text_encoder.named_modules()]
        assert "StackedLoraLinear" not in te  # the text encoder runs without LoRA (official)
        calls, handles = record_calls(hooks.mix.layers, [pool[0], pool[1]], 1.0)
        try:
            composed.generate(["a dog"], n_images=1, seed=0, num_inference_steps=2)
        finally:
            for h in handles:
                h.remove()
        assert len(calls) == 2 * count
    finally:
        gen.close()


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides,key", [
    ({"pattern": "t"}, "method.pattern"),
    ({"alpha": 0.0}, "method.alpha"),
    ({"alpha": "big"}, "method.alpha"),
    ({"beta": float("nan")}, "method.beta"),
    ({"lora_scale": None}, None),  # null: the default 1.0
    ({"lora_scale": "x"}, "method.lora_scale"),
    ({"sum_timesteps": 0}, "method.sum_timesteps"),
    ({"sum_timesteps": 2.5}, "method.sum_timesteps"),
    ({"subject": 1}, "method.style"),  # subject == style
    ({"subject": -1}, "method.subject"),
    ({"style": True}, "method.style"),
    ({"layers": "ff"}, "method.layers"),
    ({"extra": "keep"}, "method.extra"),
])
def test_config_errors_name_the_key(overrides, key):
    if key is None:
        KLora(cfg(**overrides))
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        KLora(cfg(**overrides))


def test_refuses_a_language_model():
    class LM:
        domain = "nlp"

    with pytest.raises(ConfigError, match="vl"):
        next(KLora(cfg()).compose(FitContext(model=LM(), pool=None, fit_examples=[], seed=0, prompt=str, score=None)))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.skipif(not (DATA_ROOT / "dreambooth").is_dir(), reason="needs ../shared/data/dreambooth")
def test_cli_k_lora_dreambooth_smoke(tmp_path):
    record, job = run_vl_job("k_lora", tmp_path / "runs", timeout=300)
    assert record["status"] == "ok" and record["method"] == "k_lora" and record["domain"] == "vl"
    metrics = {(r["subtask"], r["metric"]) for r in record["rows"]}
    assert {("dog6+wolf_plushie+backpack", m) for m in ("clip_t", "clip_i", "clip_i/dog6")} <= metrics
    info = record["rows"][0]["fit_info"]
    assert (info["subject"], info["style"], info["dropped"]) == ("dog6", "wolf_plushie", ["backpack"])
    assert len(info["subject_share_by_step"]) == 10
    assert len(sorted((job / "images").rglob("*.png"))) == 2
    assert (job / "contact-dog6+wolf_plushie+backpack-default.png").is_file()
