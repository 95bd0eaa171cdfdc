"""`method=core_space` against a float64 reference written from the paper's equations and the official code
(apanariello4/core-space-merging: `MatrixPerLayerMerger.get_core_matrices` / `_merge_tensors` /
`get_tsv_delta_w`, `isotropize_matrix`, `merging_functions.ties_merging`): the reference bases from plain SVDs of
the unpadded stacks ``[s_1B_1 … s_NB_N]`` and ``[A_1; …; A_N]``, ``M_i = U_Bᵀ Δ_i V_A``, the merge in core space,
``ΔW = α · U_B M V_Aᵀ``. Adapters: peft-style LoRAs of mixed ranks, on a module with Σr < d and one with Σr > d.
Tolerances: 1e-10 × the largest entry (1e-12 where the result is exact: the lossless linear merge).
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from methods.core_space import core_factors
from methods.ops.merge_ops import stack_factors
from test_knots import close, experts, make, official_ties, shuffle_ranks


def make_core(**overrides):
    return make("core_space", **overrides)


def official_tsv(cores: list[torch.Tensor], drop_zero: bool = False) -> torch.Tensor:
    """`get_tsv_delta_w`: per task the top ⌊q/N⌋ triplets in zero-filled stacks, the stacked singular vectors
    orthogonalized by their SVDs. `drop_zero`: leave out the triplets of zero singular value (the method's rule)."""
    n = len(cores)
    sum_u = sum_s = sum_v = None
    for i, core in enumerate(cores):
        u, s, v = torch.linalg.svd(core, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * (1 / n))
        if drop_zero:
            k = min(k, int((s > 1e-9 * s[0]).sum()))
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def official_isotropize(M: torch.Tensor, drop_zero: bool = False) -> torch.Tensor:
    """`isotropize_matrix`: every singular value set to their mean. `drop_zero`: over the nonzero ones only (the
    method's rule; the official mean counts the zeros and adds their arbitrary singular vectors back)."""
    U, S, V = torch.linalg.svd(M, full_matrices=False)
    if drop_zero:
        keep = S > 1e-9 * S[0]
        U, S, V = U[:, keep], S[keep], V[keep]
    return U @ torch.diag(S.mean() * torch.ones_like(S)) @ V


def reference(adapters: list[LoraAdapter], weights: list[float], merger: str, density: float = 1.0,
              isotropize: bool = False, alpha: float = 1.0, drop_zero: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for module in adapters[0].modules:
        parts = [a.modules[module] for a in adapters]
        U_B = torch.linalg.svd(torch.cat([m.scale * m.B for m in parts], dim=1), full_matrices=False)[0]
        V_A = torch.linalg.svd(torch.cat([m.A for m in parts], dim=0), full_matrices=False)[2].T
        cores = [U_B.T @ m.delta() @ V_A for m in parts]
        if merger == "ties":
            merged = official_ties(cores, weights, density)
        elif merger == "tsv":
            merged = official_tsv([w * c for w, c in zip(weights, cores)], drop_zero)
        else:
            merged = sum(w * c for w, c in zip(weights, cores))
        if isotropize:
            merged = official_isotropize(merged, drop_zero)
        out[module] = alpha * U_B @ merged @ V_A.T
    return out


@pytest.mark.parametrize("merger, density, ranks", [
    ("linear", 1.0, (2, 4, 8)), ("ties", 0.1, (2, 4, 8)), ("ties", 0.5, (2, 4, 8)), ("ties", 1.0, (2, 4, 8)),
    ("tsv", 1.0, (4, 4, 6)),  # ⌊q/N⌋ ≤ every rank: the official code's triplets are all nonzero
])
@pytest.mark.parametrize("isotropize", [False, True])
@pytest.mark.parametrize("weights, alpha", [([1.0, 1.0, 1.0], 0.6), ([0.7, 1.3, 0.4], 1.0)])
def test_equals_the_reference_on_mixed_ranks(merger, density, ranks, isotropize, weights, alpha):
    pool = experts(ranks)
    got = make_core(merger=merger, density=density, isotropize=isotropize, alpha=alpha).merge(pool, weights)
    expected = reference(pool, weights, merger, density, isotropize, alpha, drop_zero=True)
    for module in expected:
        close(got[module], expected[module])


@pytest.mark.parametrize("merger, density", [("linear", 1.0), ("ties", 0.5), ("ties", 1.0)])
def test_where_every_singular_value_is_nonzero_the_zero_rule_is_the_official_code(merger, density):
    """Full-rank cores and merges (these do; sparse TIES cores and TSV of fewer than Σr triplets do not): the
    official isotropic mean and TSV triplets, zeros included, give the method's result."""
    pool, weights = experts((4, 4, 6)), [0.7, 1.3, 0.4]
    got = make_core(merger=merger, density=density, isotropize=True).merge(pool, weights)
    expected = reference(pool, weights, merger, density, isotropize=True)
    for module in expected:
        close(got[module], expected[module])


def test_tsv_leaves_out_the_zero_triplets_of_low_rank_tasks():
    """Ranks 2, 4, 8: ⌊q/N⌋ = 4 (Σr = 14) and 3 (q = 10) exceed rank 2, whose extra triplets are zero."""
    pool, weights = experts((2, 4, 8)), [0.7, 1.3, 0.4]
    got = make_core(merger="tsv").merge(pool, weights)
    expected = reference(pool, weights, "tsv", drop_zero=True)
    for module in expected:
        close(got[module], expected[module])


def test_cores_are_sigma_r_square_and_lossless_despite_the_padding():
    """Mixed ranks reach the merge zero-padded to the largest rank; the cores are still the official Σr × Σr
    (min(d, Σr) where Σr > d) and ``U_B M_i V_Aᵀ = Δ_i``."""
    pool = experts((2, 4, 8))
    for module, (d_out, d_in) in {"q_proj": (24, 20), "v_proj": (12, 10)}.items():
        A, B = stack_factors(pool, module, torch.float64)
        U_B, P, Q, V_A = core_factors(A, B)
        M = P @ Q
        assert M.shape == (3, min(d_out, 14), min(d_in, 14))
        for core, adapter in zip(M, pool):
            close(U_B @ core @ V_A.T, adapter.modules[module].delta(), 1e-12)


def test_linear_is_exactly_task_arithmetic():
    pool, weights = experts((2, 4, 8)), [0.5, -1.5, 2.0]
    got = make_core(merger="linear").merge(pool, weights)
    for module, delta in got.items():
        close(delta, sum(w * a.modules[module].delta() for w, a in zip(weights, pool)), 1e-12)


@pytest.mark.parametrize("merger", ["ties", "linear", "tsv"])
@pytest.mark.parametrize("isotropize", [False, True])
def test_pool_order_and_rank_order_do_not_matter_and_weights_follow_their_experts(merger, isotropize):
    pool, weights, order = experts((2, 4, 8, 4)), [0.7, -0.2, 1.1, 0.4], (2, 0, 3, 1)
    method = make_core(merger=merger, density=0.3, isotropize=isotropize)
    first = method.merge(pool, weights)
    permuted = method.merge([shuffle_ranks(pool[i], seed=i) for i in order], [weights[i] for i in order])
    swapped = method.merge(pool, [weights[i] for i in order])
    for module in first:
        close(permuted[module], first[module])
        assert not torch.allclose(swapped[module], first[module])


@pytest.mark.parametrize("merger, density", [("linear", 0.1), ("ties", 1.0), ("tsv", 0.1)])
def test_one_expert_comes_back(merger, density):
    (expert,) = experts((4,))
    got = make_core(merger=merger, density=density).merge([expert], [1.0])
    for module, m in expert.modules.items():
        close(got[module], m.delta())


def test_isotropize_flattens_the_spectrum_of_the_merge():
    (expert,) = experts((4,))
    got = make_core(merger="linear", isotropize=True).merge([expert], [1.0])
    for module, m in expert.modules.items():
        s = torch.linalg.svdvals(got[module])
        close(s[:4], torch.linalg.svdvals(m.delta())[:4].mean().expand(4))
        assert s[4:].abs().max() < 1e-12


def test_zero_updates_merge_to_zero():
    pool = [LoraAdapter(a.name, a.base_model, {k: LoraModule(m.A, torch.zeros_like(m.B), m.scale)
                                               for k, m in a.modules.items()}) for a in experts()]
    for merger in ("ties", "tsv"):
        for delta in make_core(merger=merger, isotropize=True).merge(pool, [1.0] * 3).values():
            assert torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize("field, value", [("merger", "dare"), ("density", 0.0), ("density", 1.01), ("alpha", -1.0),
                                          ("isotropize", "yes"), ("rank", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make_core(**{field: value})
