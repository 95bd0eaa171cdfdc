"""WUDI-Merging (`method=wudi`) against its definition: the dense objective Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²/‖τ_i‖²
optimised as the official code does (Adam, lr 1e-5, 300 steps from Σ_i τ_i, autograd, one dense
(N, d_out, d_in) tensor), written here from the paper's equation; the gradient against autograd; the properties
(the objective falls, pool and rank order and weights, one expert, orthogonal inputs); the report and configs.

Tolerances: float64 runs agree with the dense reference to rounding (rtol 1e-12, seen 1e-14: the factored
gradient sums in another order, and Adam carries that); the float32 default agrees to float32 rounding carried
through Adam (rtol 1e-5 of the largest entry, seen 2e-7).
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from conftest import assert_composes_then_restores
from methods.linear import dense_deltas
from methods.ops.merge_ops import stack_factors
from methods.wudi import Interference
from test_merges import FakePipeline, close, context, make_method, method_cfg, shuffle_ranks

# d_in 20 < 2·N·r = 24 takes the Gram form of the gradient, d_in 40 the factored one
SHAPES = {"layers.0.q": (24, 20), "layers.0.up": (40, 20), "layers.1.down": (20, 40)}
RANKS = [3, 1, 4]  # mixed ranks: padded to 4 when stacked


def adapter(name: str, rank: int, seed: int, shapes=SHAPES) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {m: LoraModule(torch.randn(rank, d_in, generator=g, dtype=torch.float64) / d_in**0.5,
                             0.1 * torch.randn(d_out, rank, generator=g, dtype=torch.float64), 2.0 / rank)
               for m, (d_out, d_in) in shapes.items()}
    return LoraAdapter(name, "base", modules, task_type=None)


def pool(ranks=RANKS) -> list[LoraAdapter]:
    return [adapter(f"e{i}", r, seed=20 + i) for i, r in enumerate(ranks)]


def objective(merged: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """The paper's interference, dense: Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²."""
    norms = taus.flatten(1).norm(dim=1).square()
    return ((merged - taus) @ taus.transpose(1, 2)).square().sum((1, 2)).div(norms).sum()


def official(taus: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """Adam (no weight decay) on the dense objective from the task-arithmetic sum, gradients by autograd."""
    merged = torch.nn.Parameter(taus.sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(steps):
        optimizer.zero_grad()
        objective(merged, taus).backward()
        optimizer.step()
    return merged.detach()


def task_vectors(experts: list[LoraAdapter], module: str, weights=None) -> torch.Tensor:
    weights = weights or [1.0] * len(experts)
    return torch.stack([w * e.modules[module].delta() for w, e in zip(weights, experts)])


def composed(experts: list[LoraAdapter], **overrides):
    """(the merged ΔW per module, the report) of `method=wudi` on a fake pipeline."""
    fake = FakePipeline()
    (result,) = list(make_method("wudi", **overrides).compose(context(fake, experts)))
    kind, what = fake.applied[0]
    return (what if kind == "deltas" else dense_deltas(what, torch.float64)), result.report


# --------------------------------------------------------------------- the official optimisation


@pytest.mark.parametrize("steps, lr, weights", [(300, 1e-5, None), (60, 1e-2, None), (60, 1e-2, [0.7, -0.4, 1.2])])
def test_equals_the_dense_official_optimisation(steps, lr, weights):
    experts = pool()
    merged, _ = composed(experts, dtype="float64", steps=steps, lr=lr, **({"weights": weights} if weights else {}))
    for module in SHAPES:
        taus = task_vectors(experts, module, weights)
        expected = official(taus, steps, lr)
        assert (expected - taus.sum(0)).abs().max() > 1e-3 * taus.abs().max()  # it moved
        close(merged[module], expected)


def test_float32_default_is_the_official_optimisation_to_float32_rounding():
    experts = pool()
    merged, _ = composed(experts)
    for module in SHAPES:
        close(merged[module], official(task_vectors(experts, module)), rtol=1e-5)


def test_both_gradient_forms_are_taken():
    experts = pool()
    forms = {m: Interference(*stack_factors(experts, m, torch.float64)).gram for m in SHAPES}
    assert forms == {"layers.0.q": True, "layers.0.up": True, "layers.1.down": False}


@pytest.mark.parametrize("module", list(SHAPES))
def test_gradient_and_objective_equal_autograd_of_the_dense_objective(module):
    experts = pool()
    weights = [0.5, 1.5, -0.8]
    A, B = stack_factors(experts, module, torch.float64)
    loss = Interference(A, B * torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1))
    taus = task_vectors(experts, module, weights)
    merged = torch.randn(taus.shape[1:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    merged.requires_grad_(True)
    value = objective(merged, taus)
    value.backward()
    delta = merged.detach() - taus.sum(0)
    close(loss.objective(delta), value.detach())
    close(loss.gradient(delta), merged.grad, rtol=1e-11)
    close(loss.start(), taus.sum(0))


# --------------------------------------------------------------------- properties


def test_the_objective_falls_from_task_arithmetic():
    experts = pool()
    merged, report = composed(experts, dtype="float64")
    starts, ends, sum_sq, merged_sq = [], [], 0.0, 0.0
    for module in SHAPES:
        taus = task_vectors(experts, module)
        starts.append(objective(taus.sum(0), taus).item())
        ends.append(objective(merged[module], taus).item())
        assert ends[-1] < starts[-1]
        sum_sq += taus.sum(0).norm().item() ** 2
        merged_sq += merged[module].norm().item() ** 2
    assert report.info["objective_start"] == pytest.approx(sum(starts), rel=1e-12)
    assert report.info["objective_end"] == pytest.approx(sum(ends), rel=1e-12)
    assert report.info["norm_vs_sum"] == pytest.approx((merged_sq / sum_sq) ** 0.5, rel=1e-9)


def test_pool_order_rank_order_and_weights_follow_their_experts():
    experts = pool()
    weights = [0.7, -0.4, 1.2]
    order = (2, 0, 1)
    first, _ = composed(experts, dtype="float64", weights=weights)
    permuted, _ = composed([shuffle_ranks(experts[i], seed=i) for i in order], dtype="float64",
                           weights=[weights[i] for i in order])
    for module in SHAPES:
        close(permuted[module], first[module], rtol=1e-10)


def test_weights_scale_the_task_vectors_and_weight_zero_drops_an_expert():
    experts = pool()
    weights = [0.7, 0.0, 1.2]
    merged, _ = composed(experts, dtype="float64", weights=weights, steps=60, lr=1e-2)
    scaled = [LoraAdapter(e.name, e.base_model, {m: LoraModule(x.A, w * x.B, x.scale) for m, x in e.modules.items()})
              for w, e in zip(weights, experts)]
    kept, _ = composed([scaled[0], scaled[2]], dtype="float64", steps=60, lr=1e-2)
    for module in SHAPES:
        close(merged[module], kept[module], rtol=1e-10)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 1e-6)])
def test_one_expert_is_its_own_minimiser_and_is_returned(dtype, rtol):
    (expert,) = pool([3])
    merged, report = composed([expert], dtype=dtype, lr=1e-2)
    for module, m in expert.modules.items():
        close(merged[module], m.delta(), rtol=rtol)
        assert objective(m.delta(), m.delta()[None]) == 0
    assert report.info["objective_start"] == report.info["objective_end"] == 0


def test_inputs_in_orthogonal_subspaces_keep_the_task_arithmetic_sum():
    """A_j A_iᵀ = 0 for j ≠ i (disjoint input coordinates): (Σ_j τ_j − τ_i) τ_iᵀ = 0, the sum is optimal."""
    experts = pool()
    for i, e in enumerate(experts):
        for m in e.modules.values():
            keep = torch.zeros(m.d_in, dtype=torch.bool)
            keep[i::len(experts)] = True
            m.A.mul_(keep)
    merged, report = composed(experts, dtype="float64", lr=1e-2)
    for module in SHAPES:
        close(merged[module], task_vectors(experts, module).sum(0))
    assert report.info["objective_end"] == 0


# --------------------------------------------------------------------- the method


def test_report_output_and_defaults():
    cfg = method_cfg("wudi")
    assert (cfg.steps, cfg.lr, cfg.dtype, cfg.fold, cfg.rank) == (300, 1e-5, "float32", True, None)  # official
    experts = pool()
    fake = FakePipeline()
    (result,) = list(make_method("wudi", fold=False, steps=7).compose(context(fake, experts)))
    assert result.report.steps == 7 * len(SHAPES) and result.report.seconds > 0
    assert result.report.info["objective_end"] < result.report.info["objective_start"]
    assert {m.rank for m in result.adapter.modules.values()} == {max(RANKS)}
    assert not make_method("wudi").uses_seed()


@pytest.mark.parametrize("field, value", [("steps", -1), ("steps", 1.5), ("steps", True), ("lr", 0.0), ("lr", -1e-5),
                                          ("lr", "x"), ("lr", float("inf")), ("dtype", "float16"), ("rank", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make_method("wudi", **{field: value})


def test_on_the_tiny_llama_base_weights_are_restored(tiny_lm, make_pool):
    assert_composes_then_restores(tiny_lm, make_pool(3, ranks=[2, 4, 3], seed=5), make_method("wudi", steps=5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_equals_the_cpu_result():
    experts = pool()
    method = make_method("wudi", dtype="float64", steps=60, lr=1e-2)
    for module in SHAPES:
        A, B = stack_factors(experts, module, torch.float64)
        w = torch.ones(len(experts), dtype=torch.float64)
        cpu = method.merge_module(A, B, w, None)
        gpu = method.merge_module(A.cuda(), B.cuda(), w.cuda(), None)
        close(gpu.cpu(), cpu, rtol=1e-9)
