"""Arrow and GenKnowSub (methods/arrow.py) against references written here from the papers' equations and peft 0.21.2
(peft/tuners/lora/arrow.py: ``ArrowLoraLinearLayer``), in float64:

- prototype of expert i at a layer: the top right-singular vector of the dense ΔW_i = s_i B_i A_i
  (``torch.linalg.svd``; compared up to sign, which routing ignores);
- gates of token x: scores |⟨x, v_i⟩|, the top-k kept, softmax(score / T) over them, 0 elsewhere (a loop over
  tokens and a sort here); layer output W x + Σ_i g_i ΔW_i x;
- GenKnowSub: A_i − mean_g A_g, B_i − mean_g B_g per layer, s_i kept (peft ``gen_know_sub``);
- the whole tiny Llama under `method=arrow` equals peft's ``create_arrow_model`` on the same adapters (saved as
  peft folders), with and without ``use_gks``.

peft computes prototypes by 15 float32 power-iteration steps from a random start; ours are exact. The peft
comparison therefore (a) checks peft's prototypes against the SVD reference at float32 precision, on adapters with
a clear gap between their first two singular values (so that 15 steps converge), then (b) puts the float64 SVD
reference prototypes into peft's layers and compares the logits at float64 precision.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear
from methods.arrow import (Arrow, ArrowRouter, arrow_attached, arrow_prototypes, fused_routed_forward,
                           fused_routed_weight, gen_know_sub, routed_forward)
from methods.base import FitContext
from conftest import random_adapter

PROMPTS = ["not True and False is", "( True or False ) and not ( False or True ) is"]
F64 = dict(rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- references
def ref_prototype(delta: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of a dense update (d_out × d_in)."""
    return torch.linalg.svd(delta.double())[2][0]


def assert_same_up_to_sign(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    """Rows equal up to a sign each."""
    signs = torch.sign((actual * expected).sum(-1, keepdim=True))
    torch.testing.assert_close(actual, signs * expected, rtol=0, atol=atol)


def ref_gates(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, T: float) -> torch.Tensor:
    """x (..., d) -> (..., N), token by token: |⟨x, v_i⟩|, top-k by sorting, softmax(score / T) over the kept."""
    flat = x.reshape(-1, x.shape[-1]).double()
    n = prototypes.shape[0]
    out = torch.zeros(flat.shape[0], n, dtype=torch.float64)
    for t, tok in enumerate(flat):
        scores = [abs(float(tok @ prototypes[i].double())) for i in range(n)]
        kept = sorted(range(n), key=lambda i: -scores[i])[: min(top_k, n)]
        top = max(scores[i] for i in kept)
        e = {i: torch.exp(torch.tensor((scores[i] - top) / T, dtype=torch.float64)) for i in kept}
        total = sum(e.values())
        for i in kept:
            out[t, i] = e[i] / total
    return out.reshape(*x.shape[:-1], n)


def ref_output(W: torch.Tensor, deltas: list[torch.Tensor], x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    y = x @ W.T
    for i, delta in enumerate(deltas):
        y = y + gates[..., i : i + 1] * (x @ delta.T)
    return y


def ref_gks(task: LoraModule, general: list[LoraModule]) -> torch.Tensor:
    """ΔW of a task module after GenKnowSub: s_i (B_i − mean B_g)(A_i − mean A_g)."""
    A = task.A.double() - sum(g.A.double() for g in general) / len(general)
    B = task.B.double() - sum(g.B.double() for g in general) / len(general)
    return task.scale * B @ A


# ----------------------------------------------------------------------------------------- helpers
def synthetic_pool(ranks=(2, 4, 3, 1), d_in=12, d_out=9, seed=0, paths=("l.0.q", "l.1.q")) -> ExpertPool:
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i, r in enumerate(ranks):
        modules = {p: LoraModule(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                                 torch.randn(d_out, r, generator=g, dtype=torch.float64), 0.5 + i) for p in paths}
        adapters.append(LoraAdapter(f"e{i}", "synthetic", modules))
    return ExpertPool("synthetic", adapters)


def stacked(pool: ExpertPool, path: str, seed: int = 1) -> tuple[StackedLoraLinear, torch.Tensor]:
    m0 = pool[0].modules[path]
    base = nn.Linear(m0.d_in, m0.d_out, bias=False).double()
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=torch.Generator().manual_seed(seed),
                                      dtype=torch.float64))
    return StackedLoraLinear(base, [a.modules[path] for a in pool], path), base.weight.detach()


def tokens(d: int, shape=(2, 5), seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cfg(**over):
    return OmegaConf.create({"name": "arrow", "top_k": 3, "temperature": 1.0, "gks": False, "general": [], **over})


def double_lm(lm):
    return dataclasses.replace(lm, model=copy.deepcopy(lm.model).double())


def gapped_adapter(lm, name: str, seed: int, size: float = 1.0) -> LoraAdapter:
    """A random float64 rank-4 adapter whose first rank component is 16× the others at every layer (a clear gap
    between the top two singular values), all of it times `size`."""
    adapter = random_adapter(lm.model, name, lm.model_id, rank=4, seed=seed, dtype=torch.float64)
    for m in adapter.modules.values():
        m.A[0] *= 4
        m.B[:, 0] *= 4
        m.B *= size
    return adapter


def logits(lm_model, enc) -> torch.Tensor:
    with torch.no_grad():
        return lm_model(**enc).logits


def arrow_logits(lm, pool: ExpertPool, enc, **over) -> torch.Tensor:
    method = Arrow(cfg(**over))
    gen = method.compose(FitContext(lm, pool, [], 0, lambda e: e.input, score=None))
    composed = next(gen)
    out = logits(composed.model.model, enc)
    gen.close()
    return out


# ----------------------------------------------------------------------------------------- prototypes, gates, output
def test_prototypes_are_the_top_right_singular_vectors_of_each_update():
    pool = synthetic_pool(ranks=(2, 4, 3, 1, 5))
    prototypes = arrow_prototypes(pool)
    assert set(prototypes) == {"l.0.q", "l.1.q"}
    for path, P in prototypes.items():
        assert P.shape == (5, 12) and P.dtype == torch.float64
        expected = torch.stack([ref_prototype(a.modules[path].delta(torch.float64)) for a in pool])
        assert_same_up_to_sign(P, expected)
        torch.testing.assert_close(P.norm(dim=-1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("top_k,T", [(1, 1.0), (2, 0.7), (3, 2.5), (4, 1.0), (9, 0.3)])
def test_gates_and_layer_output_equal_the_reference(top_k, T):
    """Mixed ranks (2, 4, 3, 1: zero-padded in the stacked layer), per-token routing of (2, 5) tokens; top_k = 9 > N
    is all four experts. Also the benchmark entry points `routed_forward` and `fused_routed_forward`."""
    pool = synthetic_pool()
    path = "l.1.q"
    layer, W = stacked(pool, path)
    reference_protos = torch.stack([ref_prototype(a.modules[path].delta(torch.float64)) for a in pool])
    deltas = [a.modules[path].delta(torch.float64) for a in pool]
    x = tokens(12)
    expected_gates = ref_gates(x, reference_protos, top_k, T)
    expected = ref_output(W, deltas, x, expected_gates)
    assert ((expected_gates > 0).sum(-1) == min(top_k, 4)).all()

    router = ArrowRouter({path: layer}, arrow_prototypes(pool), min(top_k, 4), T)
    router.record = True
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(router.records[0][1], expected_gates, **F64)
    torch.testing.assert_close(out, expected, **F64)
    P = router.prototypes[path]
    with torch.no_grad():
        torch.testing.assert_close(routed_forward(layer, x, P, min(top_k, 4), T), expected, **F64)
        fused = fused_routed_forward(x, fused_routed_weight(layer, P), layer.B_cat, 4, layer.rank, min(top_k, 4), T)
    torch.testing.assert_close(fused, expected, **F64)
    router.remove()
    assert layer.gate_fn is None


def test_top_k_all_with_a_huge_temperature_is_the_uniform_mixture_and_top_1_is_one_expert():
    pool = synthetic_pool()
    path = "l.0.q"
    layer, W = stacked(pool, path)
    deltas = [a.modules[path].delta(torch.float64) for a in pool]
    x = tokens(12, seed=5)
    router = ArrowRouter({path: layer}, arrow_prototypes(pool), 4, 1e12)
    router.record = True
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(router.records[-1][1], torch.full((2, 5, 4), 0.25, dtype=torch.float64), **F64)
    torch.testing.assert_close(out, x @ (W + sum(deltas) / 4).T, **F64)
    router.remove()
    router = ArrowRouter({path: layer}, arrow_prototypes(pool), 1, 1.0)
    with torch.no_grad():
        out = layer(x)
    protos = torch.stack([ref_prototype(d) for d in deltas])
    best = (x @ protos.T).abs().argmax(-1)  # (2, 5)
    expected = torch.stack([torch.stack([x[b, t] @ (W + deltas[int(best[b, t])]).T for t in range(5)])
                            for b in range(2)])
    torch.testing.assert_close(out, expected, **F64)
    router.remove()


# ----------------------------------------------------------------------------------------- GenKnowSub
def test_gen_know_sub_subtracts_the_mean_general_factors():
    pool = synthetic_pool(ranks=(3, 3, 3, 3, 3))
    task, general = pool.adapters[:3], [pool[4], pool[3]]
    out = gen_know_sub(task, general)
    assert [a.name for a in out] == ["e0", "e1", "e2"]
    for a, t in zip(out, task):
        for path, m in a.modules.items():
            gm = [g.modules[path] for g in general]
            torch.testing.assert_close(m.A, t.modules[path].A - (gm[0].A + gm[1].A) / 2, **F64)
            torch.testing.assert_close(m.B, t.modules[path].B - (gm[0].B + gm[1].B) / 2, **F64)
            assert m.scale == t.modules[path].scale
            torch.testing.assert_close(m.delta(torch.float64), ref_gks(t.modules[path], gm), **F64)
    # the stacked layer of the subtracted experts routes on the subtracted updates' prototypes
    path = "l.0.q"
    sub = ExpertPool("synthetic", out)
    layer, W = stacked(sub, path)
    deltas = [ref_gks(t.modules[path], [g.modules[path] for g in general]) for t in task]
    protos = torch.stack([ref_prototype(d) for d in deltas])
    x = tokens(12, seed=9)
    ArrowRouter({path: layer}, arrow_prototypes(sub), 2, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref_output(W, deltas, x, ref_gates(x, protos, 2, 0.5)), **F64)


# ----------------------------------------------------------------------------------------- against peft
@pytest.mark.parametrize("gks", [False, True])
def test_the_model_equals_peft_create_arrow_model(tiny_lm, tmp_path, gks):
    from peft import ArrowConfig, create_arrow_model

    top_k, T = 2, 0.8
    task = [gapped_adapter(tiny_lm, f"t{i}", seed=40 + i) for i in range(4)]
    general = [gapped_adapter(tiny_lm, f"g{i}", seed=60 + i, size=0.3) for i in range(2)] if gks else []
    paths = {}
    for a in task + general:
        paths[a.name] = str(a.save(tmp_path / a.name))
    peft_model = create_arrow_model(copy.deepcopy(tiny_lm.model).double(), [paths[a.name] for a in task],
                                    ArrowConfig(top_k=top_k, router_temperature=T, use_gks=gks, rng_seed=0),
                                    general_adapter_paths=[paths[a.name] for a in general] or None)
    enc = tiny_lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    logits(peft_model, enc)  # peft applies GenKnowSub and builds its prototypes on the first forward
    for path in task[0].modules:
        deltas = [ref_gks(t.modules[path], [g.modules[path] for g in general]) if gks
                  else t.modules[path].delta(torch.float64) for t in task]
        reference = torch.stack([ref_prototype(d) for d in deltas])
        arrow_layer = peft_model.base_model.model.get_submodule(path).lora_arrow["arrow_router"]
        assert_same_up_to_sign(arrow_layer.prototypes, reference, atol=1e-5)  # (a) float32 power iteration
        arrow_layer.prototypes.copy_(reference)  # (b) exact prototypes in peft's router
    expected = logits(peft_model, enc)

    # the pool holds the general experts among the task experts; `general` names them
    mixed = ExpertPool(tiny_lm.model_id, [task[0], *general[:1], task[1], task[2], *general[1:], task[3]])
    ours = arrow_logits(double_lm(tiny_lm), mixed, enc, top_k=top_k, temperature=T, gks=gks,
                        general=[g.name for g in general])
    torch.testing.assert_close(ours, expected, **F64)
    base = logits(copy.deepcopy(tiny_lm.model).double(), enc)
    assert (ours - base).abs().max() > 1e-3  # the experts do change the output


# ----------------------------------------------------------------------------------------- through the model
def test_each_layer_routes_its_own_input_tokens_and_pool_order_does_not_matter(tiny_lm, make_pool):
    lm = double_lm(tiny_lm)
    pool = make_pool(4, ranks=[2, 4, 3, 4], seed=3)
    enc = tiny_lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with arrow_attached(lm, pool, top_k=2, temperature=0.6) as router:
        io = {}
        handles = [layer.register_forward_hook(lambda m, args, out, p=path: io.__setitem__(p, args[0]))
                   for path, layer in router.layers.items()]
        router.record = True
        first = logits(lm.model, enc)
        for h in handles:
            h.remove()
        assert [p for p, _ in router.records] == list(router.layers)
        real = enc["attention_mask"].bool()  # padding enters layer 0 as x = 0: all scores tie, any choice is right
        for path, gates in router.records:
            protos = torch.stack([ref_prototype(a.modules[path].delta(torch.float64)) for a in pool])
            torch.testing.assert_close(gates[real], ref_gates(io[path], protos, 2, 0.6)[real], **F64)
    order = [2, 0, 3, 1]
    shuffled = ExpertPool(pool.base_model, [pool[i] for i in order])
    with arrow_attached(lm, shuffled, top_k=2, temperature=0.6) as router:
        router.record = True
        second = logits(lm.model, enc)
        permuted = dict(router.records)
    torch.testing.assert_close(second, first, **F64)
    with arrow_attached(lm, pool, top_k=2, temperature=0.6) as router:
        router.record = True
        logits(lm.model, enc)
        for path, gates in router.records:
            torch.testing.assert_close(permuted[path][real], gates[..., order][real], **F64)
    # GenKnowSub: neither the order of the task experts nor that of the general ones matters
    five = make_pool(5, rank=4, seed=4)
    a = arrow_logits(lm, five, enc, gks=True, general=["e1", "e3"], top_k=2)
    b = arrow_logits(lm, ExpertPool(five.base_model, [five[i] for i in (4, 3, 2, 1, 0)]), enc, gks=True,
                     general=["e3", "e1"], top_k=2)
    torch.testing.assert_close(a, b, **F64)


def test_compose_contract(tiny_lm, make_pool):
    pool = make_pool(3)
    method = Arrow(cfg(top_k=5, temperature=2.0))
    assert not method.uses_seed()
    gen = method.compose(FitContext(tiny_lm, pool, [], 0, lambda e: e.input, score=None))
    composed = next(gen)
    layer = tiny_lm.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, StackedLoraLinear) and layer.gate_fn is not None
    report = composed.report
    assert (report.examples, report.steps, report.trained_params) == (0, 0, 0)
    assert composed.variant == "" and composed.hooks is None and composed.save("/nonexistent") is None
    assert report.info["top_k"] == 5 and report.info["top_k_used"] == 3 and report.info["experts"] == pool.names
    assert 0 <= report.info["prototype_overlap"] <= 1
    out = composed.generate(PROMPTS, max_new_tokens=3)
    assert len(out) == 2
    gen.close()
    assert type(tiny_lm.model.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear  # restored
    gen = Arrow(cfg(gks=True, general=["e2"])).compose(FitContext(tiny_lm, pool, [], 0, None, None))
    gks = next(gen)
    gen.close()
    assert gks.variant == "gks" and gks.report.info["experts"] == ["e0", "e1"] and gks.report.info["general"] == ["e2"]


# ----------------------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("over,key", [
    (dict(top_k=0), "method.top_k"), (dict(top_k=1.5), "method.top_k"), (dict(top_k=True), "method.top_k"),
    (dict(temperature=0.0), "method.temperature"), (dict(temperature=-1), "method.temperature"),
    (dict(gks="yes"), "method.gks"), (dict(gks=True), "method.general"), (dict(gks=True, general=None), "method.general"),
    (dict(general="e0"), "method.general"),
])
def test_config_errors_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Arrow(cfg(**over))


@pytest.mark.parametrize("over", [dict(general=["nope"]), dict(general=["e0", "e1", "e2", "e3"]),
                                  dict(gks=True, general=["e0"])])
def test_pool_dependent_errors_name_the_key(over):
    pool = synthetic_pool()  # ranks 2, 4, 3, 1: GenKnowSub's factor subtraction needs equal ranks
    gen = Arrow(cfg(**over)).compose(FitContext(None, pool, [], 0, None, None))
    with pytest.raises(ConfigError, match=r"method\.general"):
        next(gen)
