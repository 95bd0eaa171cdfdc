"""CMLoRA (methods/cmlora.py) against references written here from the official code (Yqcca/CMLoRA @ 5e79e41:
fft_analysis.ipynb, pipeline_offline.py): the frequency score (an explicit DFT and radial binning in plain Python),
the ordering, the refresh steps and the dominance schedule (hand-written lists and a transcription of the official
``indicator`` loop), the weights, the per-step predictions with and without caching (float64, UNet evaluations
counted), a sampling run on the tiny pipeline, config errors and the CLI smoke run."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from conftest import CONF, DATA_ROOT
from methods.base import FitContext
from methods.cmlora import (CMLoRA, CMLoRAHooks, dominance_schedule, dominance_weights, evaluation_plan,
                            frequency_order, frequency_score, refresh_steps)
from methods.lora_composite import CompositeHooks
from test_vl_common import random_sd_pool, run_vl_job, tiny_sd


def ctx_for(model, pool):
    return FitContext(model=model, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input, score=None)


def method_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.load(CONF / "method" / "cmlora.yaml"), overrides)


# ----------------------------------------------------------------------------- frequency score (fft_analysis.ipynb)


def reference_score(rgb: np.ndarray, low: int) -> float:
    """fft_analysis.ipynb cell 5, with np.fft replaced by the DFT sum and the binning by loops."""
    H, W = rgb.shape[:2]
    gray = [[float(int((int(rgb[y, x, 0]) + int(rgb[y, x, 1]) + int(rgb[y, x, 2])) / 3)) for x in range(W)]
            for y in range(H)]
    F = [[sum(gray[y][x] * cmath.exp(-2j * math.pi * (u * y / H + v * x / W)) for y in range(H) for x in range(W))
          for v in range(W)] for u in range(H)]
    crow, ccol = H // 2, W // 2
    shifted = [[F[(u - crow) % H][(v - ccol) % W] for v in range(W)] for u in range(H)]  # np.fft.fftshift
    bins: dict[int, list[float]] = {}
    for u in range(H):
        for v in range(W):
            r = int(math.sqrt((v - ccol) ** 2 + (u - crow) ** 2))
            bins.setdefault(r, []).append(math.log(abs(shifted[u][v]) + 1e-8))
    profile = [sum(bins[r]) / len(bins[r]) for r in range(max(bins) + 1)]
    top = max(profile)
    relative = [p / top for p in profile]
    return sum(relative[low:]) / len(relative[low:])


@pytest.mark.parametrize("shape,low", [((16, 16), 5), ((12, 20), 3), ((16, 16), 0)])
def test_frequency_score_equals_the_notebook(shape, low):
    rng = np.random.default_rng(sum(shape) + low)
    rgb = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    rgb[: shape[0] // 2] //= 3  # some structure, so the spectrum is not flat
    cutoff = low / min(shape)  # exact binary fractions: ⌊cutoff · side⌋ = low
    assert frequency_score(rgb, cutoff) == pytest.approx(reference_score(rgb, low), rel=1e-10, abs=1e-10)
    assert int(math.floor(0.140625 * 512)) == 72  # the default is the notebook's `low = 72` at 512 px


def test_smooth_image_scores_lower_and_ordering_is_by_score():
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.repeat(((np.sin(xx / 6.0) + np.cos(yy / 7.0) + 2) * 60).astype(np.uint8)[..., None], 3, axis=2)
    assert frequency_score(smooth, 0.25) < frequency_score(noisy, 0.25)
    assert frequency_order([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]  # highest first, ties in pool order
    with pytest.raises(ConfigError, match="fft_cutoff"):
        frequency_score(noisy, 0.49 * 3)  # beyond every radius bin


# ----------------------------------------------------------------------------- refresh steps, dominance, weights


def test_refresh_steps_are_the_official_interval_seq():
    assert refresh_steps(10, 0) == [0, 2, 3, 6, 8]  # ⌊3.75⌋ = 3, ⌊8.75⌋ = 8: 0,2 | 3,6 | 8
    assert refresh_steps(16, 0) == [0, 2, 4, 6, 9, 12, 14]  # 6, 14: 0,2,4 | 6,9,12 | 14
    assert refresh_steps(10, 1) == list(range(10))
    assert refresh_steps(10, 3) == [0, 3, 6, 9]
    seq = refresh_steps(220, 0)  # the official default: 220 steps, ⌊82.5⌋ = 82, ⌊192.5⌋ = 192
    assert (len(seq), seq[40], seq[41], seq[77], seq[78], seq[-1]) == (92, 80, 82, 190, 192, 218)
    with pytest.raises(ConfigError, match="cache_interval"):
        refresh_steps(10, -1)


@pytest.mark.parametrize("steps,interval,n_high,n_low,late,expected", [
    # refresh 0,2,3,6,8 -> k = 0,0,1,2,2,2,3,3,4,4; late from step 6 (5.5 rounded up): 1 + k mod 2
    (10, 0, 2, 1, 0.55, [0, 0, 1, 0, 0, 0, 2, 2, 1, 1]),
    (8, 1, 3, 0, 0.55, [0, 1, 2, 0, 1, 2, 0, 1]),  # no low-frequency expert: no late shift
    (12, 2, 2, 1, 0.5, [0, 0, 1, 1, 0, 0, 2, 2, 1, 1, 2, 2]),
    (6, 2, 1, 2, 0.5, [0, 0, 0, 2, 2, 2]),  # one high-frequency expert; late window = the last R = 1
    (5, 1, 2, 0, 1.0, [0, 1, 0, 1, 0]),
])
def test_dominance_schedule_by_hand(steps, interval, n_high, n_low, late, expected):
    assert dominance_schedule(steps, n_high, n_low, refresh_steps(steps, interval), late) == expected


def official_dominant(T: int, cache_interval: int, R: int, A: int, last_early: int) -> list[int]:
    """pipeline_offline.py l. 1082-1178 transcribed: interval_seq, `indicator`, the dominant index per step
    (`(indicator-1) % len(real_list)`, `+ 1` after step `last_early` when there is a background LoRA; A ≤ 1 there)."""
    if cache_interval == 0:
        range1 = list(range(0, int(0.375 * T), 2))
        range2 = list(range(int(0.375 * T), int(0.875 * T), 3))
        range3 = list(range(int(0.875 * T), T, 2))
        interval_seq = range1 + range2 + range3
    elif cache_interval == 1:
        interval_seq = list(range(T))
    else:
        interval_seq = list(range(0, T, cache_interval))
    indicator, out = 0, []
    for i in range(T):
        if i in interval_seq:
            indicator += 1
        if A == 0 or i <= last_early:
            out.append((indicator - 1) % R)
        else:
            out.append(((indicator - 1) % R) + 1)
    return out


@pytest.mark.parametrize("T", [1, 2, 7, 10, 23, 50, 220])
@pytest.mark.parametrize("interval", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("R,A", [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (4, 1)])
def test_dominance_schedule_equals_the_official_indicator_loop(T, interval, R, A):
    late = 0.55
    last_early = int(math.floor(late * T + 0.5)) - 1  # T = 220: 120, the official `i <= 120`
    ours = dominance_schedule(T, R, A, refresh_steps(T, interval), late)
    assert ours == official_dominant(T, interval, R, A, last_early)
    if T == 220:
        assert last_early == 120


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_weights_are_the_official_ones(n):
    coeff = n - 0.5  # official: dom_lora_coeff = len(adapters2) - 0.5
    nondom = n / (coeff + n - 1)
    dom = nondom * coeff
    w_dom, w_other = dominance_weights(n)
    assert (w_dom, w_other) == pytest.approx((dom / n, nondom / n), rel=1e-15)  # the official mean over N
    assert w_dom + (n - 1) * w_other == pytest.approx(1.0, rel=1e-15)
    assert dominance_weights(n, 1.0) == pytest.approx((1 / n, 1 / n), rel=1e-15)  # dom_coeff 1: LoRA Composite


def test_evaluation_plan_by_hand():
    refresh = [0, 2, 3, 6, 8]
    dominant = [2, 2, 0, 2, 2, 2, 1, 1, 0, 0]
    every = [0, 1, 2]
    assert evaluation_plan(10, dominant, refresh, 3, cache=False) == [every] * 10
    assert evaluation_plan(10, dominant, refresh, 3, cache=True, policy="all") == [
        every, [2], every, every, [2], [2], every, [1], every, [0]]
    assert evaluation_plan(10, dominant, refresh, 3, cache=True, policy="dominant") == [
        every, [2], [0], [2], [2], [2], [1], [1], [0], [0]]


# ----------------------------------------------------------------------------- predictions on the tiny pipeline


class EvalRecorder:
    """A UNet forward pre-hook that records, per call, which experts the call evaluates (mix.only or one-hot rows)."""

    def __init__(self, model, mix):
        self.mix, self.calls, self.on = mix, [], True
        self.handle = model.unet.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        if not self.on:
            return
        if self.mix.single is not None:
            self.calls.append([self.mix.single])
        elif self.mix.weights is not None:
            self.calls.append(self.mix.weights.abs().argmax(1).unique_consecutive().tolist())
        else:
            self.calls.append([])


def run_against_reference(model, mix, hooks, order, dominant_pos, plan, weights, steps, noise, prompt="a dog"):
    """Drive the sampling loop by hand: at every step compare hooks.noise with Σ_l w_l ε_l, where ε_l is computed
    here (serially, expert l alone) at the steps `plan` lists and reused otherwise. Returns the per-step experts the
    hooks evaluated."""
    scale, guidance = hooks.scale, 7.5
    embeds = hooks.embed(model, [prompt] * len(noise), [""] * len(noise), True)
    scheduler = model.scheduler
    scheduler.set_timesteps(steps, device=model.device)
    latents = noise.to(model.device, model.dtype) * scheduler.init_noise_sigma
    recorder = EvalRecorder(model, mix)
    cache, evaluated = {}, []
    try:
        for i, t in enumerate(scheduler.timesteps):
            inputs = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            start = len(recorder.calls)
            pred = hooks.noise(model, inputs, t, i, embeds)
            evaluated.append(sorted(e for call in recorder.calls[start:] for e in call))
            recorder.on = False
            for expert in plan[i]:
                mix.only(expert, scale)
                cache[expert] = model.unet_noise(inputs, t, embeds[expert])
            mix.off()
            recorder.on = True
            dom = order[dominant_pos[i]]
            ref = sum((weights[0] if e == dom else weights[1]) * cache[e] for e in range(mix.n))
            assert torch.allclose(pred, ref, atol=1e-10, rtol=0), f"step {i}"
            uncond, cond = pred.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, return_dict=False)[0]
    finally:
        recorder.handle.remove()
    return evaluated, latents


# T = 10, cache_interval 0: refresh 0,2,3,6,8; 2 high + 1 low; order [2, 0, 1] -> dominant positions below
STEPS, ORDER = 10, [2, 0, 1]
POSITIONS = [0, 0, 1, 0, 0, 0, 2, 2, 1, 1]
EVERY = [0, 1, 2]
PLANS = {  # experts computed at each step (pool indices), by hand from the refresh steps and POSITIONS
    (False, "all"): [EVERY] * STEPS,
    (True, "all"): [EVERY, [2], EVERY, EVERY, [2], [2], EVERY, [1], EVERY, [0]],
    (True, "dominant"): [EVERY, [2], [0], [2], [2], [2], [1], [1], [0], [0]],
}


@pytest.mark.parametrize("cache,refresh", list(PLANS))
@pytest.mark.parametrize("batched", [True, False])
def test_predictions_and_unet_evaluations_follow_the_schedule(cache, refresh, batched):
    model = tiny_sd("float64")
    plan = PLANS[(cache, refresh)]
    with model.experts_applied(random_sd_pool(model, 3, text_encoder=True)) as mix:
        hooks = CMLoRAHooks(mix, 0.9, ORDER, 1, cache=cache, cache_interval=0, refresh=refresh, late_start=0.55,
                            batched=batched)
        evaluated, _ = run_against_reference(model, mix, hooks, ORDER, POSITIONS, plan, dominance_weights(3),
                                             STEPS, model.initial_noise(2, 5))
    assert evaluated == plan
    assert hooks.stats == {"expert_evals": sum(map(len, plan)), "steps": STEPS}
    assert hooks.dominant == [ORDER[p] for p in POSITIONS]


def test_uncached_with_unit_coefficient_is_lora_composite():
    model = tiny_sd("float64")
    noise = model.initial_noise(1, 3)
    with model.experts_applied(random_sd_pool(model, 3)) as mix:
        embed = lambda h: h.embed(model, ["a red clock"], [""], True)  # noqa: E731
        composite = CompositeHooks(mix, 0.8, batched=False)
        reference = model.sample(noise, embed(composite), 6, 7.5, composite)
        hooks = CMLoRAHooks(mix, 0.8, [1, 2, 0], 1, dom_coeff=1.0, cache=False, cache_interval=2)
        ours = model.sample(noise, embed(hooks), 6, 7.5, hooks)
        weighted = CMLoRAHooks(mix, 0.8, [1, 2, 0], 1, cache=False, cache_interval=2)
        dominated = model.sample(noise, embed(weighted), 6, 7.5, weighted)
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0)
    assert (dominated - reference).abs().max() > 1e-6  # the dominant weight changes the result


def test_one_expert_is_that_expert_alone():
    from methods.lora_switch import SwitchHooks

    model = tiny_sd("float64")
    noise = model.initial_noise(1, 4)
    with model.experts_applied(random_sd_pool(model, 1, text_encoder=True)) as mix:
        hooks = CMLoRAHooks(mix, 0.8, [0], 1, cache=True, cache_interval=3)
        assert hooks.n_low == 0 and hooks.w_dom == 1.0  # n_low capped: one expert stays high-frequency
        ours = model.sample(noise, hooks.embed(model, ["a dog"], [""], True), 5, 7.5, hooks)
        switch = SwitchHooks(mix, 100, 0.8)
        alone = model.sample(noise, switch.embed(model, ["a dog"], [""], True), 5, 7.5, switch)
    assert torch.allclose(ours, alone, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- the method on the tiny pipeline


def test_compose_orders_by_profiled_frequency_and_sampling_follows_the_schedule():
    model = tiny_sd()
    pool = random_sd_pool(model, 3, names=["dog6", "wolf_plushie", "backpack"])
    pool[0].metadata = {"token": "izz", "class": "dog"}
    before = dict(model.components.named_modules())
    cfg = method_cfg(fft_steps=3, fft_guidance=7.5, fft_seed=4, fft_cutoff=0.25, cache_interval=0)
    gen = CMLoRA(cfg).compose(ctx_for(model, pool))
    composed = next(gen)
    info = composed.report.info
    mix = composed.model.hooks.mix
    # reference scores: each expert alone generates the profiling image; the notebook's score on it
    prompts = ["a photo of izz dog", "a photo of wolf plushie", "a photo of backpack"]
    scores = []
    for i, prompt in enumerate(prompts):
        mix.only(i, cfg.lora_scale)  # each expert alone at the method's LoRA scale
        image = model.generate([prompt], n_images=1, seed=4, num_inference_steps=3, guidance_scale=7.5)[0]
        mix.off()
        scores.append(reference_score(np.asarray(image.convert("RGB")), int(0.25 * model.resolution)))
    names = pool.names
    expected_order = sorted(range(3), key=lambda i: (-scores[i], i))
    assert info["order"] == [names[i] for i in expected_order]
    assert [info["frequency_scores"][n] for n in names] == pytest.approx(scores, rel=1e-9, abs=1e-9)
    assert info["high_frequency"] == info["order"][:2] and info["low_frequency"] == info["order"][2:]
    assert info["weights"] == pytest.approx({"dominant": 2.5 / 4.5, "other": 1 / 4.5})
    # sampling: 10 steps, one batched UNet call per step, evaluating the planned experts
    recorder = EvalRecorder(model, mix)
    try:
        images = composed.generate(["a dog"], n_images=1, seed=0, num_inference_steps=STEPS)
    finally:
        recorder.handle.remove()
    dominant = [expected_order[p] for p in POSITIONS]  # the hand-written positions through the profiled order
    every = [0, 1, 2]
    expected = [every, [dominant[1]], every, every, [dominant[4]], [dominant[5]], every, [dominant[7]], every,
                [dominant[9]]]
    assert [sorted(c) for c in recorder.calls] == expected
    assert composed.model.hooks.dominant == dominant
    assert info["compute"] == {"expert_evals": 3 * 5 + 5, "steps": STEPS}
    assert len(images) == 1 and images[0].size == (model.resolution, model.resolution)
    gen.close()
    assert all(model.components.get_submodule(n) is m for n, m in before.items())


def test_pool_order_skips_profiling():
    model = tiny_sd()
    pool = random_sd_pool(model, 2)
    calls = []
    handle = model.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        gen = CMLoRA(method_cfg(order="pool")).compose(ctx_for(model, pool))
        composed = next(gen)
    finally:
        handle.remove()
    assert calls == [] and composed.report.info["order"] == ["e0", "e1"]
    assert composed.report.info["frequency_scores"] is None and composed.report.info["low_frequency"] == ["e1"]
    gen.close()


@pytest.mark.parametrize("key,value", [
    ("cache_interval", -1), ("n_low", -1), ("dom_coeff", 0), ("late_start", 1.5), ("fft_cutoff", 0.6),
    ("refresh", "sometimes"), ("order", "random"), ("form", "parallel"), ("text_encoder", "shared"),
    ("cache", "yes"), ("fft_steps", 0), ("fft_images", 0), ("fft_prompt", "a photo"), ("lora_scale", 0),
    ("fft_seed", "abc"),
])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        CMLoRA(method_cfg(**{key: value}))


def test_defaults_are_valid_and_vl_only():
    method = CMLoRA(method_cfg())
    assert method.domains == ("vl",) and method.uses_seed() is False
    assert method.params()["fft_steps"] == 50 and method.params()["cache_interval"] == 0


# ----------------------------------------------------------------------------- the CLI on the smoke V&L stack


@pytest.mark.skipif(not (DATA_ROOT / "dreambooth").is_dir(), reason="needs ../shared/data/dreambooth")
def test_cli_cmlora_dreambooth_smoke(tmp_path):
    record, job = run_vl_job("cmlora", tmp_path / "runs")
    assert record["status"] == "ok" and record["domain"] == "vl"
    rows = [r for r in record["rows"] if r["subtask"] == "dog6+wolf_plushie+backpack"]
    assert {"clip_t", "clip_i", "clip_i/dog6"} <= {r["metric"] for r in rows}
    info = rows[0]["fit_info"]
    assert sorted(info["order"]) == sorted(record["experts"]) and len(info["frequency_scores"]) == 3
    # profile=smoke_vl: 2 prompts × 1 image in one sampling batch of 10 steps; refresh steps 0,2,3,6,8 evaluate all
    # 3 experts, the other 5 steps the dominant one only (LoRA Composite: 30)
    assert info["compute"] == {"expert_evals": 3 * 5 + 5, "steps": 10}
    assert len(sorted((job / "images").rglob("*.png"))) == 2


def test_per_expert_text_encoder_embeddings_follow_the_schedule_too():
    model = tiny_sd("float64")
    plan = PLANS[(True, "all")]
    with model.experts_applied(random_sd_pool(model, 3, text_encoder=True)) as mix:
        hooks = CMLoRAHooks(mix, 0.9, ORDER, 1, cache=True, cache_interval=0, text_encoder="per_expert")
        embeds = hooks.embed(model, ["a dog"], [""], True)
        assert not torch.equal(embeds[0], embeds[1])  # expert i's rows read expert i's encoding
        evaluated, _ = run_against_reference(model, mix, hooks, ORDER, POSITIONS, plan, dominance_weights(3),
                                             STEPS, model.initial_noise(1, 6))
    assert evaluated == plan
