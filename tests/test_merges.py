"""The dense-delta merges (ties, dare, magnitude_prune), svd and linear variants: equal to peft's
`merge_utils` functions on the same inputs and seed, the algebraic properties, the methods end to end on
the tiny Llama and on UNet-like adapters, and clear errors for bad configs.

Tolerances: comparisons are in float64; where our op order differs from peft's (the weighted sum as one
matrix product, DARE's 1/density folded into the weights) results agree to rounding, rtol 1e-12 and
atol 1e-12 × the largest entry. Where the computation is the same (a dense merge or LoRA-LEGO of a
permuted pool, a repeated seed) we ask for bit equality; methods whose sums follow pool order (linear,
svd) and SVD re-factorizations agree to 1e-10.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft.utils import merge_utils

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.load import load_adapter
from bench.lora.pool import ExpertPool
from bench.registry import get_method
from methods.base import FitContext
from methods.linear import concat_merge, dense_deltas
from methods.ops.merge_ops import (
    dare_masks, dense_to_lora, fold_lora_, fold_loras_, merge_dense, merge_stacked, module_seed, stack_factors,
)
from conftest import RecordingModel as FakePipeline
from conftest import assert_composes_then_restores, shuffle_ranks

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
KINDS = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
MERGE_METHODS = ["linear", "ties", "dare", "magnitude_prune", "svd", "lora_lego"]
# the 2024–26 data-free merges (methods.ops.merge_ops.ModuleMergeMethod): their own tests check them against
# their papers; here, what every merge must do
DATA_FREE = ["knots", "core_space", "tsv", "iso_c", "iso_cts", "wudi", "della", "breadcrumbs"]
EXACT = {"wudi": {"dtype": "float64"}}  # methods that compute in float32 by default, switched to float64 here


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def adapter(name: str, shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0, scale: float = 2.0,
            base: str = "base") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {m: LoraModule(torch.randn(rank, d_in, generator=g, dtype=torch.float64) / d_in**0.5,
                             torch.randn(d_out, rank, generator=g, dtype=torch.float64), scale / rank)
               for m, (d_out, d_in) in shapes.items()}
    return LoraAdapter(name, base, modules, task_type=None)


SHAPES = {"layers.0.q": (12, 10), "layers.0.up": (16, 10), "layers.1.q": (12, 10)}


def pool(n: int = 3, ranks=None, shapes=SHAPES) -> list[LoraAdapter]:
    ranks = ranks or [4] * n
    return [adapter(f"e{i}", shapes, r, seed=10 + i) for i, r in enumerate(ranks)]


def peft_dare_masks(shape, n: int, density: float) -> list[torch.Tensor]:
    """The keep-masks peft's `random_pruning` draws, in order, for n float32 deltas of `shape` (global RNG as
    seeded by the caller): DARE's masks are drawn in float32 whatever the factors' dtype."""
    ones = torch.ones(shape, dtype=torch.float32)
    return [merge_utils.random_pruning(ones, density, rescale=False).bool() for _ in range(n)]


def peft_reference(kind: str, deltas: list[torch.Tensor], weights: list[float], density: float, sign: str):
    """peft's merge of float64 `deltas`; DARE kinds drop with the masks peft draws for float32 deltas (seed the
    global RNG first), then run peft's own merge on the dropped, rescaled deltas (``ties`` at density 1 = TIES
    without trimming, which is what peft's `dare_ties` runs after its drop)."""
    w = torch.tensor(weights, dtype=torch.float64)
    if kind.startswith("dare") and density < 1.0:
        masks = peft_dare_masks(deltas[0].shape, len(deltas), density)
        dropped = [d * m / density for d, m in zip(deltas, masks)]
        if kind == "dare_ties":
            return merge_utils.ties(dropped, w, 1.0, sign)
        return merge_utils.task_arithmetic(dropped, w)
    if kind == "ties":
        return merge_utils.ties(deltas, w, density, sign)
    if kind == "dare_ties":
        return merge_utils.dare_ties(deltas, w, density, sign)
    if kind == "dare_linear":
        return merge_utils.dare_linear(deltas, w, density)
    return merge_utils.magnitude_prune(deltas, w, density)


# --------------------------------------------------------------------- equal to peft's merge_utils


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("kind, sign", [(k, "total") for k in KINDS] + [(k, "frequency") for k in ("ties", "dare_ties")])
@pytest.mark.parametrize("density", [0.3, 0.75, 1.0])
def test_stacked_merge_equals_peft(kind, density, sign):
    """Same inputs, and for DARE the global RNG seeded as our generator: same result as peft."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(9, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    weights = [0.9, 0.4, -0.3, 1.2]
    ours = merge_stacked(torch.stack(deltas), weights, kind, density, sign, torch.Generator().manual_seed(123))
    torch.manual_seed(123)
    close(ours, peft_reference(kind, deltas, weights, density, sign))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_dense_equals_peft_per_module(kind):
    """From adapters (experts in name order, DARE seeded per module) to peft on each module's deltas;
    experts of different ranks are handled (dense deltas do not need equal ranks)."""
    adapters = pool(3, ranks=[4, 2, 3])
    weights = [0.5, 1.0, 0.7]
    merged = merge_dense(adapters[::-1], weights[::-1], kind, density=0.4, seed=7)
    for module, ours in merged.items():
        deltas = [a.modules[module].delta() for a in adapters]
        torch.manual_seed(module_seed(7, module))
        close(ours, peft_reference(kind, deltas, weights, 0.4, "total"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dare_masks_do_not_depend_on_the_factor_dtype(dtype):
    """One seed, one mask: the masks drawn for float32 deltas equal those for float64 / float16 deltas, and
    equal peft's `random_pruning` draws for float32 deltas; dare_linear in float32 and float64 agree to float32
    rounding (same entries dropped)."""
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 9, 7, generator=g, dtype=torch.float64)
    ref = dare_masks(stacked.float(), 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(dare_masks(stacked.to(dtype), 0.4, torch.Generator().manual_seed(5)), ref)
    torch.manual_seed(5)
    assert torch.equal(torch.stack(peft_dare_masks((9, 7), 3, 0.4)), ref)
    assert 0 < ref.sum() < ref.numel()
    w = [0.5, -1.0, 0.7]
    in64 = merge_stacked(stacked.clone(), w, "dare_linear", 0.4, generator=torch.Generator().manual_seed(5))
    in32 = merge_stacked(stacked.float(), w, "dare_linear", 0.4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(in32.double(), in64, rtol=1e-5, atol=1e-5)


def test_stack_factors_pads_ranks_exactly():
    adapters = pool(3, ranks=[4, 2, 3])
    A, B = stack_factors(adapters, "layers.0.q")
    assert A.shape == (3, 4, 10) and B.shape == (3, 12, 4)
    for i, a in enumerate(adapters):
        close(B[i] @ A[i], a.modules["layers.0.q"].delta())


# --------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_and_order_free(kind):
    adapters = pool(4)
    weights = [0.4, 0.3, 0.2, 0.1]
    first = merge_dense(adapters, weights, kind, density=0.5, seed=3)
    again = merge_dense(adapters, weights, kind, density=0.5, seed=3)
    order = [2, 0, 3, 1]
    permuted = merge_dense([adapters[i] for i in order], [weights[i] for i in order], kind, density=0.5, seed=3)
    other_seed = merge_dense(adapters, weights, kind, density=0.5, seed=4)
    for module in first:
        assert torch.equal(first[module], again[module])
        assert torch.equal(first[module], permuted[module])
        if kind.startswith("dare"):
            assert not torch.equal(first[module], other_seed[module])


@pytest.mark.parametrize("kind", KINDS)
def test_one_expert_weight_one_reproduces_it(kind):
    (a,) = pool(1)
    merged = merge_dense([a], [1.0], kind, density=1.0)
    for module, delta in merged.items():
        close(delta, a.modules[module].delta())


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_merge_dense_rejects_density_outside_unit_interval(density):
    with pytest.raises(ConfigError, match="density"):
        merge_dense(pool(2), [0.5, 0.5], "ties", density=density)


def test_dare_density_one_equals_linear():
    adapters = pool(3, ranks=[4, 2, 3])
    weights = [0.2, 0.5, 0.3]
    dare = merge_dense(adapters, weights, "dare_linear", density=1.0)
    linear = dense_deltas(concat_merge(adapters, weights), torch.float64)
    for module in linear:
        close(dare[module], linear[module])


def test_ties_density_one_with_agreeing_signs_is_the_mean():
    """Experts sharing A and B up to positive factors agree in sign everywhere: the disjoint mean is the mean."""
    base = adapter("e0", SHAPES)
    adapters = [LoraAdapter(f"e{i}", "base", {k: LoraModule(m.A, m.B * c, m.scale) for k, m in base.modules.items()})
                for i, c in enumerate([0.5, 1.0, 2.5])]
    ties = merge_dense(adapters, [1.0, 1.0, 1.0], "ties", density=1.0)
    for module, merged in ties.items():
        mean = torch.stack([a.modules[module].delta() for a in adapters]).mean(0)
        close(merged, mean)


def test_dense_to_lora_full_rank_is_exact_and_truncation_is_optimal():
    adapters = pool(3)
    deltas = merge_dense(adapters, [1.0, 1.0, 1.0], "ties", density=0.5)
    full = dense_to_lora(deltas, 10, adapters[0], "ties")  # rank ≥ min(d_out, d_in)
    low = dense_to_lora(deltas, 3, adapters[0], "ties")
    for module, delta in deltas.items():
        close(full.modules[module].delta(), delta, rtol=1e-10)
        s = torch.linalg.svdvals(delta)
        err = (low.modules[module].delta() - delta).norm()
        close(err, s[3:].norm(), rtol=1e-10)  # Eckart–Young


def test_fold_loras_folds_every_module():
    g = torch.Generator().manual_seed(2)
    folds = [(torch.randn(5, 4, generator=g, dtype=torch.float64),
              LoraModule(torch.randn(2, 4, generator=g, dtype=torch.float64),
                         torch.randn(5, 2, generator=g, dtype=torch.float64), 0.5)) for _ in range(3)]
    expected = [W + 0.5 * m.B @ m.A for W, m in folds]
    fold_loras_(folds)
    for (W, _), want in zip(folds, expected):
        close(W, want)


def test_fold_lora_adds_the_update_in_place():
    a = adapter("e0", SHAPES)
    m = a.modules["layers.0.up"]
    W = torch.randn(16, 10, dtype=torch.float64)
    expected = W + m.delta()
    out = fold_lora_(W, m)
    assert out.data_ptr() == W.data_ptr()
    close(W, expected)


# --------------------------------------------------------------------- the methods


def method_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def make_method(name: str, **overrides):
    return get_method(name)(method_cfg(name, **overrides))


def context(model, experts: list[LoraAdapter], seed: int = 0) -> FitContext:
    return FitContext(model=model, pool=ExpertPool(experts[0].base_model, experts), fit_examples=[], seed=seed,
                      prompt=lambda ex: ex.input, score=lambda composed, examples: 0.0)


@pytest.mark.parametrize("name", MERGE_METHODS)
def test_configs_have_usage_line_and_pass_checks(name):
    first = (CONF / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# Usage: method={name} — ")
    method = make_method(name)
    assert set(method.domains) == {"nlp", "vl"}
    assert OmegaConf.load(CONF / f"{name}.yaml").name == name


@pytest.mark.parametrize("name, field, value", [
    ("ties", "density", 0.0), ("ties", "density", 1.5), ("dare", "density", -0.1), ("magnitude_prune", "density", "x"),
    ("ties", "rank", 0), ("dare", "rank", -2), ("svd", "rank", 0), ("lora_lego", "k", 0),
    ("ties", "majority_sign_method", "mean"), ("dare", "combination", "slerp"), ("linear", "combination", "cat"),
    ("lora_lego", "max_iter", 0),
])
def test_bad_config_is_a_clear_error(name, field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make_method(name, **{field: value})


UNET_SHAPES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 24),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (32, 64),
}


@pytest.mark.parametrize("name", MERGE_METHODS + DATA_FREE)
def test_every_merge_works_on_unet_adapters(name, tmp_path):
    experts = [adapter(f"subject{i}", UNET_SHAPES, rank=4, seed=i, base="sd-tiny") for i in range(3)]
    fake = FakePipeline()
    folding = name in ("ties", "dare", "magnitude_prune") or name in DATA_FREE
    method = make_method(name, **({"fold": False} if folding else {}))
    (composed,) = list(method.compose(context(fake, experts)))
    kind, applied = fake.applied[0]
    assert kind == "adapter" and composed.adapter is applied
    assert set(applied.modules) == set(UNET_SHAPES)
    reloaded = load_adapter(composed.save(tmp_path / name))  # a peft folder
    for module, m in applied.modules.items():
        got = reloaded.modules[module]
        assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B) and got.scale == m.scale


def composed_deltas(name: str, experts: list[LoraAdapter], **overrides) -> dict[str, torch.Tensor]:
    """The dense ΔW a method composes (folded deltas, or its adapter's updates), on the fake pipeline."""
    fake = FakePipeline()
    list(make_method(name, **overrides).compose(context(fake, experts, seed=2)))
    kind, what = fake.applied[0]
    return what if kind == "deltas" else dense_deltas(what, torch.float64)


@pytest.mark.parametrize("name", MERGE_METHODS + DATA_FREE)
def test_permuting_the_pool_changes_nothing(name):
    experts = pool(4)
    first = composed_deltas(name, experts, **EXACT.get(name, {}))
    permuted = composed_deltas(name, [experts[i] for i in (2, 0, 3, 1)], **EXACT.get(name, {}))
    for module in first:
        close(permuted[module], first[module], rtol=1e-10)


@pytest.mark.parametrize("name", MERGE_METHODS + DATA_FREE)
def test_permutations_a_name_sort_cannot_undo_change_nothing(name):
    """Weights that follow their expert through a pool permutation, and ranks permuted inside every LoRA (the
    sort by expert name undoes neither): the merged ΔW is unchanged."""
    experts = pool(4)
    order = (2, 0, 3, 1)
    weights = [0.7, -0.2, 1.1, 0.4]
    with_weights = "weights" in method_cfg(name)
    first = composed_deltas(name, experts, **EXACT.get(name, {}), **({"weights": weights} if with_weights else {}))
    permuted = composed_deltas(name, [shuffle_ranks(experts[i], seed=i) for i in order], **EXACT.get(name, {}),
                               **({"weights": [weights[i] for i in order]} if with_weights else {}))
    for module in first:
        close(permuted[module], first[module], rtol=1e-10)


@pytest.mark.parametrize("name", MERGE_METHODS)
def test_one_expert_with_weight_one_is_reproduced_by_every_method(name):
    (expert,) = pool(1)
    overrides = {"density": 1.0} if name in ("ties", "dare", "magnitude_prune") else {}
    if name in ("linear", "svd"):
        overrides["weights"] = [1.0]
    merged = composed_deltas(name, [expert], **overrides)
    for module, m in expert.modules.items():
        close(merged[module], m.delta(), rtol=1e-10)


@pytest.mark.parametrize("name", ["ties", "dare", "magnitude_prune"])
def test_fold_true_folds_dense_deltas(name):
    experts = pool(3)
    fake = FakePipeline()
    (composed,) = list(make_method(name).compose(context(fake, experts, seed=5)))
    kind, deltas = fake.applied[0]
    assert kind == "deltas" and composed.adapter is None
    weights = [1.0] * 3 if name == "ties" else [1 / 3] * 3
    kind_name = {"ties": "ties", "dare": "dare_linear", "magnitude_prune": "magnitude_prune"}[name]
    density = method_cfg(name).density
    expected = merge_dense(experts, weights, kind_name, density=density, seed=5, dtype=torch.float64)
    for module in expected:
        close(deltas[module], expected[module])


def test_dare_default_weights_at_density_one_equal_linear_default():
    experts = pool(3)
    fake = FakePipeline()
    list(make_method("dare", density=1.0).compose(context(fake, experts)))
    list(make_method("linear").compose(context(fake, experts)))
    dare, linear = fake.applied[0][1], dense_deltas(fake.applied[1][1], torch.float64)
    for module in linear:
        close(dare[module], linear[module])


def test_linear_normalize_and_lambda():
    experts = pool(2)
    fake = FakePipeline()
    list(make_method("linear", weights=[2.0, 6.0], normalize=True, **{"lambda": 0.5}).compose(context(fake, experts)))
    merged = dense_deltas(fake.applied[0][1], torch.float64)
    for module, delta in merged.items():
        close(delta, 0.5 * (0.25 * experts[0].modules[module].delta() + 0.75 * experts[1].modules[module].delta()))


def test_linear_peft_compat_variant_is_labelled():
    experts = pool(2)
    (composed,) = list(make_method("linear", combination="peft_compat").compose(context(FakePipeline(), experts)))
    assert composed.variant == "peft_compat (not exact)" and composed.report.info["exact"] is False


def test_svd_method_full_rank_reproduces_the_exact_sum():
    experts = pool(3, ranks=[4, 2, 3])  # different ranks are fine: the sum is exact before the SVD
    fake = FakePipeline()
    list(make_method("svd", rank=9).compose(context(fake, experts)))
    merged = dense_deltas(fake.applied[0][1], torch.float64)
    exact = dense_deltas(concat_merge(experts, [1 / 3] * 3), torch.float64)
    for module in exact:
        close(merged[module], exact[module], rtol=1e-10)


@pytest.mark.parametrize("name", ["ties", "dare", "lora_lego"])
def test_on_the_tiny_llama_base_weights_are_restored(tiny_lm, make_pool, name):
    # folded merges hold the merged delta in the base weight itself; LoRA-LEGO's output is an adapter on top
    assert_composes_then_restores(tiny_lm, make_pool(3, seed=4), make_method(name), folded=name != "lora_lego")
