"""Iso-C and Iso-CTS (`method=iso_c|iso_cts`): equal to dense float64 references written here from the paper's
equations and the official code's choices (danielm1405/iso-merging ``src/utils/iso.py``, with D = rank Δ_TA
directions instead of min(d_out, d_in)), on random adapters of mixed ranks; equal to the official code verbatim
where Δ_TA is full rank; the invariants; the methods end to end.

The references work on dense matrices with plain `torch.linalg.svd`; the methods never form them, so they agree
to rounding: atol 1e-10 × the largest entry.
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import ConfigError
from conftest import CONF, assert_composes_then_restores
from methods.linear import dense_deltas
from test_tsv import close, composed, make, merged, procrustes, svd_top, tolerance, toy_pool, weighted_deltas

# --------------------------------------------------------------------- the references


def iso_c_reference(deltas: list[torch.Tensor], alpha: float, tol: float) -> torch.Tensor:
    """``α σ̄ U Vᵀ`` over the R nonzero singular triplets of ``Δ_TA = Σ_i Δ_i``, σ̄ their mean."""
    U, S, Vh = svd_top(sum(deltas), min(deltas[0].shape), tol)
    return alpha * S.mean() * U @ Vh


def iso_cts_reference(deltas: list[torch.Tensor], alpha: float, fraction: float, tol: float) -> torch.Tensor:
    """Iso-CTS as the official `iso_cts` with D = rank Δ_TA: the common subspace (Δ_TA's top c), each task's top
    n directions of ``(I − U_c U_cᵀ) Δ_i`` (at most its rank), Procrustes on the concatenation, flat spectrum."""
    N = len(deltas)
    u, s, v = svd_top(sum(deltas), min(deltas[0].shape), tol)
    D = s.numel()
    common = int(D * fraction)
    per_task = round((D - common) / N)
    if per_task * N > D:  # the official rounding can overshoot D
        per_task = D // N
    common = D - per_task * N
    Uc, Sc, Vc = u[:, :common], s[:common], v[:common]
    tops = [svd_top(w - Uc @ Uc.T @ w, per_task, tol) for w in deltas]
    U = torch.cat([t[0] for t in tops] + [Uc], dim=1)
    S = torch.cat([t[1] for t in tops] + [Sc])
    Vh = torch.cat([t[2] for t in tops] + [Vc], dim=0)
    return alpha * S.mean() * procrustes(U) @ procrustes(Vh)


def official_iso_c(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The official `iso_c` on one 2-D key, transcribed (α = 1)."""
    new = sum(deltas) / len(deltas) * len(deltas)
    U, S, V = torch.linalg.svd(new, full_matrices=False)
    return torch.linalg.multi_dot((U, torch.diag(torch.ones_like(S) * S.mean()), V))


def official_iso_cts(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The official `iso_cts` on one 2-D key, transcribed (α = 1)."""
    shape_, N = deltas[0].shape, len(deltas)
    combined_w = sum(deltas)
    common = int(min(shape_) * fraction)
    common = min(shape_) - round((min(shape_) - common) / N) * N
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    n = int((min(shape_) - common) / N)
    for i, w in enumerate(deltas):
        u_ts, s_ts, v_ts = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            U, S, V = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
        U[:, i * n:(i + 1) * n], S[i * n:(i + 1) * n], V[i * n:(i + 1) * n, :] = u_ts[:, :n], s_ts[:n], v_ts[:n, :]
    U[:, N * n:N * n + common], S[N * n:N * n + common], V[N * n:N * n + common, :] = cu, cs, cv
    a, _, b = torch.linalg.svd(U, full_matrices=False)
    c, _, d = torch.linalg.svd(V, full_matrices=False)
    return torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(S) * S.mean()), c @ d))


def rank_and_spectrum(delta: torch.Tensor) -> tuple[int, torch.Tensor]:
    s = torch.linalg.svdvals(delta)
    rank = int((s > s[0] * 1e-10).sum())
    return rank, s[:rank]


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("weights, alpha", [(None, 1.0), ([0.7, -1.3, 2.0], 1.7)])
def test_iso_c_equals_the_dense_reference_on_mixed_ranks(weights, alpha):
    experts = toy_pool((2, 4, 8))
    w = weights or [1.0, 1.0, 1.0]
    for module, delta in merged("iso_c", experts, weights, alpha=alpha).items():
        close(delta, iso_c_reference(weighted_deltas(experts, module, w), alpha, tolerance(experts, module, w)))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("weights, alpha", [(None, 1.0), ([0.7, -1.3, 2.0], 1.7)])
def test_iso_cts_equals_the_dense_reference_on_mixed_ranks(fraction, weights, alpha):
    experts = toy_pool((2, 4, 8))
    w = weights or [1.0, 1.0, 1.0]
    got = merged("iso_cts", experts, weights, alpha=alpha, common_space_fraction=fraction)
    for module, delta in got.items():
        tol = tolerance(experts, module, w)
        close(delta, iso_cts_reference(weighted_deltas(experts, module, w), alpha, fraction, tol))


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_equal_to_the_official_code_where_the_sum_is_full_rank(fraction):
    """12×20 with ranks 2 + 4 + 8 > 12: Δ_TA has rank min(d), the official setting, where D = rank Δ_TA is
    the official min(d_out, d_in): the same ΔW as the official functions."""
    experts = toy_pool((2, 4, 8))
    deltas = weighted_deltas(experts, "v_proj", [1.0] * 3)
    close(merged("iso_c", experts)["v_proj"], official_iso_c(deltas))
    close(merged("iso_cts", experts, common_space_fraction=fraction)["v_proj"], official_iso_cts(deltas, fraction))


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_the_spectrum_is_flat_over_the_rank_of_the_sum(name):
    """Every nonzero singular value of the output equals α σ̄, and there are rank Δ_TA of them."""
    experts = toy_pool((2, 4, 8))
    for module, delta in merged(name, experts, alpha=1.5).items():
        rank, spectrum = rank_and_spectrum(delta)
        assert rank == rank_and_spectrum(sum(weighted_deltas(experts, module, [1.0] * 3)))[0]
        close(spectrum, spectrum[0].expand(rank), rtol=1e-12)


def test_iso_c_mean_is_over_the_nonzero_singular_values():
    """σ̄ = ‖Δ_TA‖_* / R, so the output's nuclear norm is α ‖Δ_TA‖_* (the official mean over min(d) values,
    zeros included, would shrink it by R / min(d))."""
    experts = toy_pool((2, 4, 8))
    for module, delta in merged("iso_c", experts, alpha=1.5).items():
        ta = sum(weighted_deltas(experts, module, [1.0] * 3))
        close(torch.linalg.matrix_norm(delta, "nuc"), 1.5 * torch.linalg.matrix_norm(ta, "nuc"))


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_one_expert_is_its_own_subspace_with_a_flat_spectrum(name):
    """One expert: ``α σ̄ U_r V_rᵀ`` of its own SVD (Iso-CTS's common and task parts together are its r
    triplets), not the expert."""
    (expert,) = toy_pool((4,))
    for module, delta in merged(name, [expert], alpha=1.5).items():
        U, S, Vh = torch.linalg.svd(expert.modules[module].delta(torch.float64), full_matrices=False)
        close(delta, 1.5 * S[:4].mean() * U[:, :4] @ Vh[:4])
        assert not torch.allclose(delta, expert.modules[module].delta(torch.float64))


def test_iso_c_zero_weight_removes_its_expert_and_zero_updates_give_zero():
    experts = toy_pool((2, 4, 8))
    got = merged("iso_c", experts, [1.0, 0.0, -1.0])
    for module, delta in merged("iso_c", [experts[0], experts[2]], [1.0, -1.0]).items():
        close(got[module], delta)
    for name in ("iso_c", "iso_cts"):
        assert all(not d.any() for d in merged(name, experts, [0.0, 0.0, 0.0]).values())


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    experts = toy_pool((2, 4, 8))
    iso_c = merged("iso_c", experts, [0.5, 1.0, -2.0])
    for module, delta in merged("iso_cts", experts, [0.5, 1.0, -2.0], common_space_fraction=1.0).items():
        close(delta, iso_c[module])


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_pool_order_does_not_matter_and_weights_follow_their_experts(name):
    experts = toy_pool((2, 4, 8))
    weights = [0.7, -0.2, 1.1]
    first = merged(name, experts, weights)
    order = (2, 0, 1)
    permuted = merged(name, [experts[i] for i in order], [weights[i] for i in order])
    for module in first:
        close(permuted[module], first[module], rtol=1e-12)


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_fold_false_is_a_lora_of_the_merged_delta(name):
    experts = toy_pool((2, 4, 8))
    kind, deltas = composed(name, experts)
    assert kind == "deltas"
    kind, adapter = composed(name, experts, fold=False, rank=14)
    assert kind == "adapter" and adapter.name == name
    for module, delta in dense_deltas(adapter, torch.float64).items():
        close(delta, deltas[module])


@pytest.mark.parametrize("name, field, value", [
    ("iso_c", "alpha", 0.0), ("iso_c", "alpha", "x"), ("iso_cts", "alpha", -1.0), ("iso_c", "rank", 0),
    ("iso_cts", "common_space_fraction", 1.5), ("iso_cts", "common_space_fraction", -0.1),
    ("iso_cts", "common_space_fraction", "x"),
])
def test_bad_config_is_a_clear_error(name, field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make(name, **{field: value})


def test_usage_lines():
    for name in ("iso_c", "iso_cts"):
        assert (CONF / "method" / f"{name}.yaml").read_text().startswith(f"# Usage: method={name} — ")


@pytest.mark.parametrize("name", ["iso_c", "iso_cts"])
def test_on_the_tiny_llama_base_weights_are_restored(tiny_lm, make_pool, name):
    assert_composes_then_restores(tiny_lm, make_pool(3, ranks=[2, 4, 8], seed=4), make(name))
