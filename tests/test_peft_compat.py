"""Our merges against peft's own `add_weighted_adapter` on a PeftModel of the tiny Llama.

Tolerances: `peft_compat` repeats peft's float32 ops in the same order, so it is compared bit for bit.
The SVD-based combinations are compared on the products ``scale·B@A`` (the factors are unique only up to
signs): ours are computed in float64, peft's in float32, so the tolerance is float32 rounding
(rtol 1e-5, atol 1e-5 × the largest entry).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from methods.linear import concat_merge, dense_deltas, peft_linear_merge
from methods.ops.merge_ops import dense_to_lora, merge_dense
from methods.svd import svd_merge
from conftest import peft_holding, random_adapter

TARGETS = ("q_proj", "v_proj", "up_proj")


def make_adapters(lm, n: int = 3, rank: int = 4, rslora: bool = False) -> list[LoraAdapter]:
    adapters = [random_adapter(lm.model, f"e{i}", lm.model_id, targets=TARGETS, rank=rank, seed=50 + i)
                for i in range(n)]
    if rslora:  # same factors, rsLoRA scale alpha / √r
        for a in adapters:
            a.use_rslora = True
            a.modules = {k: LoraModule(m.A, m.B, 8.0 / math.sqrt(rank)) for k, m in a.modules.items()}
    return adapters


def peft_weighted(lm, adapters: list[LoraAdapter], weights: list[float], combination_type: str, **kwargs):
    """Module path -> (A, B, scale) of peft's `add_weighted_adapter` result on a copy of the tiny model."""
    peft_model = peft_holding(copy.deepcopy(lm.model), adapters)
    peft_model.add_weighted_adapter([a.name for a in adapters], weights, "merged",
                                    combination_type=combination_type, **kwargs)
    out = {}
    for module in adapters[0].modules:
        layer = peft_model.base_model.model.get_submodule(module)
        out[module] = (layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(),
                       layer.scaling["merged"])
    return out


def assert_products_close(ours: LoraAdapter, theirs: dict) -> None:
    for module, (A, B, scale) in theirs.items():
        expected = (scale * B.double() @ A.double())
        actual = ours.modules[module].delta(torch.float64)
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=module)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_compat_equals_add_weighted_adapter(tiny_lm, rslora):
    adapters = make_adapters(tiny_lm, rslora=rslora)
    weights = [0.7, -0.4, 1.3]  # a negative weight takes peft's sign-on-A path
    ours = peft_linear_merge(adapters, weights)
    theirs = peft_weighted(tiny_lm, adapters, weights, "linear")
    assert set(ours.modules) == set(theirs)
    for module, (A, B, scale) in theirs.items():
        m = ours.modules[module]
        assert torch.equal(m.A, A) and torch.equal(m.B, B), module
        assert m.scale == scale, (module, m.scale, scale)


def test_peft_compat_is_not_the_exact_sum(tiny_lm):
    adapters = make_adapters(tiny_lm)
    weights = [0.5, 0.25, 0.25]
    compat, exact = dense_deltas(peft_linear_merge(adapters, weights)), dense_deltas(concat_merge(adapters, weights))
    module = next(iter(exact))
    gap = (compat[module] - exact[module]).norm() / exact[module].norm()
    assert gap > 0.1  # cross terms B_i A_j: the reason the variant is labelled "not exact"


def test_peft_compat_refuses_unequal_ranks(tiny_lm):
    adapters = [random_adapter(tiny_lm.model, "a", tiny_lm.model_id, rank=4, seed=1),
                random_adapter(tiny_lm.model, "b", tiny_lm.model_id, rank=2, seed=2)]
    with pytest.raises(ConfigError, match="equal ranks"):
        peft_linear_merge(adapters, [0.5, 0.5])


def test_svd_merge_equals_peft_svd(tiny_lm):
    """Without rsLoRA peft's merged adapter has scale lora_alpha / r = 1, and its update is the truncated SVD of
    the exact weighted sum: ours."""
    adapters = make_adapters(tiny_lm)
    weights = [0.6, 0.3, -0.2]
    ours = svd_merge(adapters, weights, rank=3)
    assert_products_close(ours, peft_weighted(tiny_lm, adapters, weights, "svd", svd_rank=3))


def test_svd_merge_under_rslora_is_peft_svd_without_its_extra_sqrt_rank(tiny_lm):
    """Under rsLoRA peft's merged adapter keeps use_rslora with lora_alpha = r, so its scale is r / √r = √r and
    its update √r × the truncated sum; ours stays the truncated sum (the stated condition of equality)."""
    adapters = make_adapters(tiny_lm, rslora=True)
    weights = [0.6, 0.3, -0.2]
    ours = svd_merge(adapters, weights, rank=3)
    theirs = peft_weighted(tiny_lm, adapters, weights, "svd", svd_rank=3)
    for module, (A, B, scale) in theirs.items():
        assert scale == pytest.approx(math.sqrt(3))
    scaled = {module: (A, B, scale / math.sqrt(3)) for module, (A, B, scale) in theirs.items()}
    assert_products_close(ours, scaled)


@pytest.mark.parametrize("kind", ["ties", "magnitude_prune"])
def test_dense_merge_to_lora_equals_peft_svd_variant(tiny_lm, kind):
    """Our `fold: false` output (dense merge + truncated SVD) equals peft's ``<kind>_svd``."""
    adapters = make_adapters(tiny_lm)
    weights = [1.0, 0.5, 0.8]
    deltas = merge_dense(adapters, weights, kind, density=0.5, dtype=torch.float64)
    ours = dense_to_lora(deltas, 4, adapters[0], name=kind)
    theirs = peft_weighted(tiny_lm, adapters, weights, f"{kind}_svd", svd_rank=4, density=0.5,
                           majority_sign_method="total")
    assert_products_close(ours, theirs)
