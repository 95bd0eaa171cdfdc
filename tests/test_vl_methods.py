"""Switch schedule (and diffusers' step-end off-by-one), Composite serial = batched = the plain pipeline for N=1,
linear merges on the diffusion model, MoLE gates; every method leaves the base model as it found it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.diffusers_lora import save_diffusers_lora
from conftest import CONF, DATA_ROOT
from methods.base import FitContext
from methods.lora_composite import CompositeHooks, LoraComposite
from methods.lora_switch import LoraSwitch, SwitchHooks, step_end_callback, switch_schedule
from test_vl_common import random_sd_pool, task_cfg, tiny_clip_cfg, tiny_sd


def ctx_for(model, pool, fit_examples=(), seed=0):
    return FitContext(model=model, pool=pool, fit_examples=list(fit_examples), seed=seed, prompt=lambda e: e.input,
                      score=None)


def record_active(model, mix):
    """A forward pre-hook on the UNet that records which single expert (and scale) each call uses."""
    calls = []
    handle = model.unet.register_forward_pre_hook(lambda *_: calls.append((mix.single, mix.single_scale)))
    return calls, handle


def latents_with(model, hooks, noise, prompt="a photo of a dog", steps=4, guidance=7.5):
    embeds = hooks.embed(model, [prompt] * len(noise), [""] * len(noise), guidance > 1)
    return model.sample(noise, embeds, steps, guidance, hooks)


# ----------------------------------------------------------------------------- LoRA Switch


@pytest.mark.parametrize("steps,n,tau,expected", [
    (10, 2, 5, [0] * 5 + [1] * 5),
    (12, 3, 2, [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]),
    (7, 4, 1, [0, 1, 2, 3, 0, 1, 2]),
    (6, 3, 10, [0] * 6),
    (4, 1, 1, [0, 0, 0, 0]),
    (23, 2, 5, [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5 + [0] * 3),
])
def test_switch_schedule(steps, n, tau, expected):
    assert switch_schedule(steps, n, tau) == expected


@pytest.mark.parametrize("n,tau", [(0, 5), (2, 0)])
def test_switch_schedule_rejects_bad_values(n, tau):
    with pytest.raises(ConfigError):
        switch_schedule(10, n, tau)
    if tau < 1:
        with pytest.raises(ConfigError, match="tau"):
            LoraSwitch(OmegaConf.create({"tau": tau}))


@pytest.mark.parametrize("steps,n,tau", [(12, 2, 5), (7, 3, 2), (6, 4, 1)])
def test_our_sampler_runs_the_scheduled_expert_at_every_step(steps, n, tau):
    model = tiny_sd()
    with model.experts_applied(random_sd_pool(model, n)) as mix:
        calls, handle = record_active(model, mix)
        try:
            latents_with(model, SwitchHooks(mix, tau, 0.8), model.initial_noise(1, 0), steps=steps)
        finally:
            handle.remove()
    assert calls == [(e, 0.8) for e in switch_schedule(steps, n, tau)]


def test_diffusers_step_end_callback_is_one_step_late_unless_shifted():
    """diffusers runs callback_on_step_end after step i: a switch made there acts from step i+1."""
    model = tiny_sd()
    steps, n, tau = 12, 2, 5
    schedule = switch_schedule(steps, n, tau)

    def run_pipe(callback):
        calls, handle = record_active(model, mix)
        mix.only(schedule[0])
        try:
            model.pipe("a dog", num_inference_steps=steps, guidance_scale=7.5, latents=model.initial_noise(1, 0),
                       callback_on_step_end=callback, output_type="latent")
        finally:
            handle.remove()
        return [e for e, _ in calls]

    def official_style(pipe, step, timestep, kwargs):  # switch at the end of steps tau, 2tau, ...
        if step > 0 and step % tau == 0:
            mix.only((mix.single + 1) % n)
        return {}

    with model.experts_applied(random_sd_pool(model, n)) as mix:
        assert run_pipe(step_end_callback(schedule, mix.only)) == schedule
        naive = run_pipe(official_style)
    assert naive == [0] * (tau + 1) + [1] * tau + [0]  # the first expert gets tau + 1 steps
    assert naive != schedule


def test_switch_method_composes_and_restores():
    model = tiny_sd()
    pool = random_sd_pool(model, 2)
    before = dict(model.components.named_modules())
    gen = LoraSwitch(OmegaConf.load(CONF / "method" / "lora_switch.yaml")).compose(ctx_for(model, pool))
    composed = next(gen)
    images = composed.generate(["a dog"], n_images=2, seed=1, num_inference_steps=3)
    assert len(images) == 2 and images[0].size == (model.resolution, model.resolution)
    assert composed.report.info == {"tau": 5, "lora_scale": 0.8, "order": ["e0", "e1"], "text_encoder": "official"}
    gen.close()
    assert all(model.components.get_submodule(n) is m for n, m in before.items())


# ----------------------------------------------------------------------------- LoRA Composite


def test_composite_serial_equals_batched_with_text_encoder_experts():
    model = tiny_sd("float64")
    noise = model.initial_noise(2, 7)
    with model.experts_applied(random_sd_pool(model, 3, text_encoder=True)) as mix:
        calls, handle = record_active(model, mix)
        serial = latents_with(model, CompositeHooks(mix, 0.8, batched=False), noise, steps=3)
        n_serial = len(calls)
        batched = latents_with(model, CompositeHooks(mix, 0.8, batched=True), noise, steps=3)
        handle.remove()
        only_first = latents_with(model, SwitchHooks(mix, 100, 0.8), noise, steps=3)
    assert (n_serial, len(calls) - n_serial) == (3 * 3, 3)  # N calls per step vs one
    assert torch.allclose(serial, batched, atol=1e-10, rtol=0)
    assert (serial - only_first).abs().max() > 1e-3  # the average is not one expert


def test_composite_with_one_expert_equals_the_stock_pipeline_with_that_lora(tmp_path):
    model = tiny_sd("float64")
    pool = random_sd_pool(model, 1, text_encoder=True)
    save_diffusers_lora(pool[0], tmp_path / "e0")
    noise = model.initial_noise(1, 2)
    cfg = OmegaConf.create({"form": "both", "lora_scale": 1.0})
    gen = LoraComposite(cfg).compose(ctx_for(model, pool))
    ours = []
    for composed in gen:
        hooks = composed.model.hooks
        ours.append((composed.variant, model.decode(latents_with(model, hooks, noise, "a red clock", steps=4))))
    assert [v for v, _ in ours] == ["form=batched", "form=serial"]
    model.pipe.load_lora_weights(str(tmp_path / "e0"), adapter_name="e0")
    try:
        ref = model.pipe("a red clock", num_inference_steps=4, guidance_scale=7.5, latents=noise.double(),
                         output_type="pt").images
    finally:
        model.pipe.unload_lora_weights()
    for _, image in ours:
        assert torch.allclose(image, ref, atol=1e-10, rtol=0)


def test_composite_rejects_unknown_form():
    with pytest.raises(ConfigError, match="form"):
        LoraComposite(OmegaConf.create({"form": "parallel"}))


# ----------------------------------------------------------------------------- linear on the diffusion model


def test_linear_method_on_diffusion_equals_uniformly_weighted_experts():
    from bench.models.diffusion import PLAIN
    from methods.linear import LinearArithmetic

    model = tiny_sd("float64")
    pool = random_sd_pool(model, 3, text_encoder=True)
    noise = model.initial_noise(1, 4)
    results = {}
    for fold in (False, True):
        cfg = OmegaConf.merge(OmegaConf.load(CONF / "method" / "linear.yaml"), {"fold": fold})
        for composed in LinearArithmetic(cfg).compose(ctx_for(model, pool)):
            results[fold] = latents_with(model, PLAIN, noise, steps=3)
    with model.experts_applied(pool) as mix:
        mix.weighted(torch.full((3,), 1 / 3, dtype=torch.float64))
        # the text encoder too: every layer mixes with the same weights
        stacked = latents_with(model, PLAIN, noise, steps=3)
    # fold=true adds ΔW computed in float32 (methods.linear.dense_deltas): float32 rounding, not float64's
    assert torch.allclose(results[False], results[True], atol=1e-5, rtol=1e-5)
    assert torch.allclose(results[False], stacked, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- MoLE on the UNet


def mole_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "method" / "mole_diffusion.yaml")
    cfg.clip = tiny_clip_cfg()
    cfg = OmegaConf.merge(cfg, {"steps": 0, "batch_size": 2, "train_steps": 2, "grad_steps": 1, "lr": 0.05})
    return OmegaConf.merge(cfg, overrides)


def dreambooth_fit(subjects):
    from tasks.dreambooth import DreamBoothTask

    if not (DATA_ROOT / "dreambooth").is_dir():
        pytest.skip(f"DreamBooth photos are read from {DATA_ROOT}/dreambooth: absent")
    task = DreamBoothTask(task_cfg(sets=["+".join(subjects)]), str(DATA_ROOT))
    return task.fit_examples(4, 0, ["+".join(subjects)])


def test_mole_untrained_gates_are_the_uniform_average():
    from bench.models.diffusion import PLAIN
    from methods.mole_diffusion import MoleDiffusion

    model = tiny_sd("float64")
    pool = random_sd_pool(model, 2, text_encoder=True)
    noise = model.initial_noise(1, 1)
    gen = MoleDiffusion(mole_cfg()).compose(ctx_for(model, pool))
    composed = next(gen)
    gated = latents_with(model, PLAIN, noise, steps=3)
    n_gates = len(composed.gates.gates)
    gen.close()
    with model.experts_applied(pool) as mix:
        mix.weighted(torch.full((2,), 0.5, dtype=torch.float64))
        uniform = latents_with(model, PLAIN, noise, steps=3)
    assert torch.allclose(gated, uniform, atol=1e-12, rtol=0)
    attention = [n for n, m in model.components.named_modules() if type(m).__name__.endswith("Attention")]
    assert n_gates == len(attention)  # granularity=block: one gate per attention module


def test_mole_training_moves_only_gates_and_masks_renormalize(tmp_path):
    from bench.models.diffusion import PLAIN
    from methods.mole_diffusion import MoleDiffusion

    model = tiny_sd()
    pool = random_sd_pool(model, 2, names=["dog6", "backpack"])
    before = {k: v.clone() for k, v in model.components.state_dict().items()}
    noise = model.initial_noise(1, 3)
    method = MoleDiffusion(mole_cfg(steps=2, masks=[["dog6"], ["cat"]], granularity="layer"))
    composed = []
    for c in method.compose(ctx_for(model, pool, dreambooth_fit(["dog6", "backpack"]))):
        gates = c.gates
        proj = torch.stack([g.proj.weight.abs().sum() for g in gates.gates.values()])
        composed.append((c.variant, c.report, latents_with(model, PLAIN, noise, steps=3), proj))
        if not c.variant:
            c.save(tmp_path / "gates")
    (v0, report, trained, proj), (v1, _, masked, _) = composed
    assert (v0, v1) == ("", "mask=dog6")
    assert report.steps == 2 and report.examples == 4 and report.trained_params == sum(
        p.numel() for p in gates.parameters())
    assert report.info["clip"].startswith("tiny-random") and len(report.info["mean_gate"]) == 2
    assert (proj > 0).all()  # every gate received a gradient and moved from zero
    assert all(torch.equal(before[k], v) for k, v in model.components.state_dict().items())
    with model.experts_applied(pool) as mix:
        mix.only(1, 1.0)  # the mask leaves backpack alone at weight 1
        backpack = latents_with(model, PLAIN, noise, steps=3)
    assert torch.allclose(masked, backpack, atol=1e-5, rtol=0)
    assert (trained - backpack).abs().max() > 1e-4
    info = json.loads((tmp_path / "gates" / "gates.json").read_text())
    assert info["granularity"] == "layer" and len(info["blocks"]) == len(gates.gates)
    assert (tmp_path / "gates" / "gates.safetensors").is_file()


def test_mole_gate_math_and_errors():
    from methods.mole_diffusion import Gate, MoleDiffusion, MoleGates, balance_loss

    w1, w2 = torch.tensor([[0.2, 0.8], [0.4, 0.6]]), torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    loss, q = balance_loss([w1, w2])  # q: mean over gates of the mean over rows
    assert torch.allclose(q, torch.tensor([0.45, 0.55]))
    assert loss.item() == pytest.approx(-(math.log(0.45) + math.log(0.55)), rel=1e-6)
    gate = Gate(2, 3, 0.2, (1.0, 3.0))  # the LM form's gate (methods.ops.mole_gate.MoleGate): LayerNorm per expert, no bias
    assert gate.proj.bias is None
    with torch.no_grad():
        gate.proj.weight.copy_(torch.arange(12.0).view(2, 6) / 10)
    outputs = torch.randn(4, 2, 3)
    logits = torch.nn.functional.layer_norm(outputs, (3,)).flatten(1) @ gate.proj.weight.T
    assert torch.allclose(gate(outputs), (logits / 1.0).softmax(-1))  # tau 0.2 is clamped to 1
    assert torch.equal(gate(outputs, torch.tensor([True, False]))[:, 1], torch.zeros(4))  # keep expert 0 only
    model = tiny_sd()
    with model.experts_applied(random_sd_pool(model, 2)) as mix:
        gates = MoleGates(mix, model.components, "block")
        follower = next(p for p in mix.layers if p.endswith("to_k"))
        with pytest.raises(RuntimeError, match="before the block's leading layer"):
            gates.weights(mix.layers[follower], torch.zeros(1, 5, 8))
    with pytest.raises(ConfigError, match="granularity"):
        MoleDiffusion(mole_cfg(granularity="network"))
    with pytest.raises(ConfigError, match="grad_steps"):
        MoleDiffusion(mole_cfg(grad_steps=3, train_steps=2))
    gen = MoleDiffusion(mole_cfg(steps=1)).compose(ctx_for(model, random_sd_pool(model, 2)))
    with pytest.raises(ConfigError, match="fit examples"):
        next(gen)
    with pytest.raises(ConfigError, match="masks"):
        gen = MoleDiffusion(mole_cfg(masks=[["e0", "e1"]])).compose(ctx_for(model, random_sd_pool(model, 2)))
        list(gen)
    assert type(model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear

