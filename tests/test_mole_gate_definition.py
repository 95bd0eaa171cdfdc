"""MoLE's gate against the paper's equations, computed here by hand (float64), in both domains; `method=mole` on a
diffusion task.

The paper (Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv 2404.13628) defines the gate of a layer as

    E_Ω(x) = Normalization(E_0(x) ⊕ … ⊕ E_{N−1}(x)),   ε = Flatten(E_Ω(x))ᵀ · e,   G(ε)_i = softmax(ε / τ)_i

with e a learnable matrix (no bias). Our "Normalization" is a parameter-free LayerNorm over each expert's d features
(eps 1e-5), E_i(x) the expert's output ``s_i B_i A_i x`` pooled over the tokens the gate reads (language models: the
prompt tokens, without padding; diffusion: every token of the call). Each test below computes that from the experts'
own LoRA factors and the captured layer input, never from the implementation's stacked buffers or helpers.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from conftest import CONF
from methods.base import FitContext
from methods.mole import Mole, diffusion_config, mole_attached, step_loss
from tasks.algorithmic import generate

EPS = 1e-5  # the LayerNorm's
TAU = 1.7  # a temperature inside [1, 3], ≠ 1


def by_hand(experts, x: torch.Tensor, mask: torch.Tensor | None, W: torch.Tensor, tau: float) -> torch.Tensor:
    """G for inputs x (batch, tokens..., d_in): experts = [(A, B, s)]; mask (batch, tokens) of the tokens to pool
    (None: all); W (N, N·d_out). Returns (batch, N)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1]).double()
    m = torch.ones(x.shape[:2], dtype=torch.float64) if mask is None else mask.double()
    pooled = []
    for A, B, s in experts:
        delta = s * (x @ A.double().T @ B.double().T)  # (batch, tokens, d_out): E_i(x) per token
        p = (delta * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # mean over the pooled tokens
        mu = p.mean(-1, keepdim=True)
        var = ((p - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
        pooled.append((p - mu) / torch.sqrt(var + EPS))
    flat = torch.cat(pooled, dim=-1)  # Flatten(E_Ω(x)): expert 0's d features, then expert 1's, ...
    eps = flat @ W.double().T  # ε = Flatten(E_Ω)ᵀ e
    z = eps / tau
    z = z - z.max(-1, keepdim=True).values
    return z.exp() / z.exp().sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------- language models
@pytest.fixture(scope="module")
def lm64(tiny_lm):
    """The tiny Llama in float64 (a copy: the session's model stays float32)."""
    return dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).double())


def randomize(router, seed=0):
    g = torch.Generator().manual_seed(seed)
    router.gates.double()
    weights = {}
    with torch.no_grad():
        for key, gate in router.gates.items():
            gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g, dtype=torch.float64))
            gate.temperature.fill_(TAU)
            weights[key] = gate.proj.weight.detach().clone()
    return weights


def capture_lead_inputs(router):
    """{gate key: [input of the lead matrix at each call]} via forward pre-hooks on the lead layers."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for key, path in router.leads.items():
        seen[key] = []
        handles.append(router.layers[path].register_forward_pre_hook(
            lambda module, args, key=key: seen[key].append(args[0].detach())))
    return seen, handles


def experts_at(pool, path):
    return [(a.modules[path].A, a.modules[path].B, a.modules[path].scale) for a in pool]


@pytest.mark.parametrize("granularity", ["block", "matrix", "network"])
def test_lm_gate_is_the_papers_gate_over_prompt_tokens(lm64, make_pool, granularity):
    pool = make_pool(3, ranks=[2, 4, 3])
    tok = lm64.tokenizer
    prompts = ["not True and False is", "( True or False ) and not ( False or True ) is", "True is"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    assert len({len(i) for i in ids}) == 3  # padding differs per row
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])  # left-padded, as generate
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with mole_attached(lm64, pool, granularity) as router:
        W = randomize(router)
        seen, handles = capture_lead_inputs(router)
        try:
            # inference: the prompt's forward (empty cache) pools the non-padding tokens
            router.records.clear()
            with torch.no_grad():
                lm64.model(input_ids=input_ids, attention_mask=mask)
            assert len(router.records) == len(router.gates)
            for key, got in router.records:
                (x,) = seen[key]
                expected = by_hand(experts_at(pool, router.leads[key]), x, mask, W[key], TAU)
                assert got.dtype == torch.float64
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
                assert (got.max(-1).values - got.min(-1).values).min() > 1e-3  # far from the uniform start
            # training: teacher-forced prompt + target, pooled over the prompt tokens only
            examples = [generate("boolean_expressions", "fit", i) for i in range(3)]
            for key in seen:
                seen[key].clear()
            step_loss(lm64, router, examples, lambda e: e.input, 256)
            lengths = [len(tok(e.input, add_special_tokens=False)["input_ids"]) for e in examples]
            for key, got in router.records:
                (x,) = seen[key]
                prompt_mask = torch.zeros(x.shape[:2])
                for row, n in enumerate(lengths):
                    prompt_mask[row, :n] = 1
                expected = by_hand(experts_at(pool, router.leads[key]), x, prompt_mask, W[key], TAU)
                torch.testing.assert_close(got.detach(), expected, rtol=0, atol=1e-10)
        finally:
            for handle in handles:
                handle.remove()


# ------------------------------------------------------------------------------------- diffusion
def test_diffusion_gate_is_the_papers_gate():
    from methods.mole_diffusion import MoleGates
    from test_vl_common import random_sd_pool, tiny_sd

    model = tiny_sd("float64")
    pool = random_sd_pool(model, 3, text_encoder=True)
    g = torch.Generator().manual_seed(5)
    with model.experts_applied(pool) as mix:
        gates = MoleGates(mix, model.components, "block", tau_init=TAU, tau_range=(1.0, 3.0)).double()
        W = {}
        with torch.no_grad():
            for key, gate in gates.gates.items():
                assert gate.proj.bias is None and not gate.proj.weight.any()  # no bias; zero start
                gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g, dtype=torch.float64))
                gate.temperature.fill_(TAU)  # τ exactly 1.7 in float64 (tau_init was stored in float32)
                W[key] = gate.proj.weight.detach().clone()
        calls = []  # (gate key, leader path, leader input), in call order
        handles = gates.register_block_hooks(model.components)
        for block, leader in gates.leader.items():
            handles.append(mix.layers[leader].register_forward_pre_hook(
                lambda module, args, k=gates.keys[block], p=leader: calls.append((k, p, args[0].detach()))))
        mix.gated(gates.weights)
        gates.recorded = []
        try:
            with torch.no_grad():
                embeds = model.encode_prompts(["a photo of a dog", "a red cat on a chair"], ["", ""], False)
                latents = torch.randn((2, *model.latent_shape), generator=g, dtype=torch.float64)
                model.unet_noise(latents, torch.tensor(500), embeds)
        finally:
            for handle in handles:
                handle.remove()
            mix.off()
        assert len(calls) == len(gates.recorded) > len(gates.gates) // 2
        assert any(p.startswith("text_encoder.") for _, p, _ in calls) and any(p.startswith("unet.") for _, p, _ in calls)
        for (key, path, x), got in zip(calls, gates.recorded):
            expected = by_hand(experts_at(pool, path), x, None, W[key], TAU)
            assert got.dtype == torch.float64 and got.shape == (2, 3)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
            assert (got.max(-1).values - got.min(-1).values).min() > 1e-3  # far from the uniform start


# ------------------------------------------------------------------------------------- method=mole everywhere
def mole_yaml(**over):
    cfg = OmegaConf.load(CONF / "method" / "mole.yaml")
    return OmegaConf.merge(cfg, over)


def test_diffusion_config_maps_the_shared_keys():
    cfg = mole_yaml(temperature_init=1.5, temperature_min=1.2, temperature_max=2.5, alpha=0.3, init_std=0.01,
                    masks=[["dog6"]], vl={"granularity": "layer", "train_steps": 4, "grad_steps": 2})
    d = diffusion_config(cfg)
    assert d.tau_init == 1.5 and list(d.tau_range) == [1.2, 2.5] and d.alpha == 0.3 and d.init_std == 0.01
    assert d.granularity == "layer" and d.train_steps == 4 and d.grad_steps == 2 and d.guidance_scale == 7.5
    assert d.lr == 1e-5 and d.steps == 800 and d.batch_size == 12 and list(d.masks) == [["dog6"]]
    assert d.clip is None  # no task here: oc.select falls back
    mine = OmegaConf.load(CONF / "method" / "mole_diffusion.yaml")  # the alias's defaults are mole's vl defaults
    base = diffusion_config(mole_yaml())
    for key in ("granularity", "tau_init", "tau_range", "init_std", "alpha", "lr", "steps", "batch_size",
                "weight_decay", "betas", "eps", "train_steps", "grad_steps", "guidance_scale", "negative_prompt",
                "masks"):
        assert OmegaConf.to_container(mine, resolve=True)[key] == OmegaConf.to_container(base)[key], key
    with pytest.raises(ConfigError, match="grad_steps"):
        Mole(mole_yaml(vl={"grad_steps": 20}))
    with pytest.raises(ConfigError, match="granularity"):
        Mole(mole_yaml(vl={"granularity": "network"}))


def test_mole_runs_the_diffusion_form_on_a_diffusion_model():
    from bench.models.diffusion import PLAIN
    from methods.mole_diffusion import MoleComposed, MoleDiffusion
    from test_vl_common import random_sd_pool, tiny_sd

    model = tiny_sd("float64")
    pool = random_sd_pool(model, 2)
    ctx = FitContext(model=model, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input, score=None)
    method = Mole(mole_yaml(steps=0))
    assert "vl" in method.domains and "nlp" in method.domains
    noise = model.initial_noise(1, 1)

    def run(m):
        gen = m.compose(ctx)
        composed = next(gen)
        assert isinstance(composed, MoleComposed) and composed.variant == ""
        embeds = model.encode_prompts(["a photo of a dog"], [""], True)
        out = model.sample(noise, embeds, 3, 7.5, PLAIN)
        n = len(composed.gates.gates)
        gen.close()
        return out, n

    ours, n_ours = run(method)
    alias, n_alias = run(MoleDiffusion(OmegaConf.merge(OmegaConf.load(CONF / "method" / "mole_diffusion.yaml"),
                                                       {"steps": 0, "clip": None})))
    assert n_ours == n_alias and torch.equal(ours, alias)
    with pytest.raises(ConfigError, match="schedule"):
        next(Mole(mole_yaml(steps=0, schedule="cosine")).compose(ctx))


def test_method_mole_task_dreambooth_composes_and_prepares():
    from hydra import compose, initialize_config_dir

    from bench.config import CONF_DIR, register_resolvers
    from bench.errors import DataError
    from bench.run.runner import prepare

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=mole", "task=dreambooth", "profile=smoke"])
    method = Mole(cfg.method)
    d = method.diffusion.cfg
    assert d.clip is not None and d.clip.model == cfg.task.clip.model  # the task's scorer by default
    assert d.train_steps == cfg.method.vl.train_steps and math.isclose(d.lr, cfg.method.lr)
    try:
        prepare(cfg)  # the domain check: `mole` supports the vl task
    except DataError as exc:
        pytest.skip(f"dreambooth data absent: {exc}")
