"""TSV-M (`method=tsv`): equal to a dense float64 reference written here from the paper's equations and the official
code's choices (AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``: k = ⌊min(d)/N⌋ per task,
here at most the task's rank), on random adapters of mixed ranks; the invariants; the method end to end.

The reference works on dense ``Δ_i`` with plain `torch.linalg.svd`; the method never forms them (QR of the
factors, SVD of the small core), so they agree to rounding: atol 1e-10 × the largest entry.
"""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter
from bench.lora.pool import ExpertPool
from bench.registry import get_method
from conftest import CONF, assert_composes_then_restores, random_adapter
from methods.base import FitContext
from methods.linear import dense_deltas
from methods.ops.spectral import lowrank_svd, polar
from conftest import RecordingModel as FakeModel

TARGETS = ("q_proj", "v_proj", "o_proj")


class Toy(torch.nn.Module):
    """The layers the tests merge: ΔW 24×20 (tall), 12×20 (wide: N·r > min(d), the official full-rank regime)
    and 40×36 (every expert's rank fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(20, 24)
        self.v_proj = torch.nn.Linear(20, 12)
        self.o_proj = torch.nn.Linear(36, 40)


def toy_pool(ranks=(2, 4, 8), seed: int = 0) -> list[LoraAdapter]:
    """Random float64 adapters of the given (mixed) ranks on `Toy`, named e0, e1, …"""
    model = Toy()
    return [random_adapter(model, f"e{i}", "toy", targets=TARGETS, rank=r, seed=seed * 100 + i, dtype=torch.float64)
            for i, r in enumerate(ranks)]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def weighted_deltas(experts: list[LoraAdapter], module: str, weights) -> list[torch.Tensor]:
    """The dense ``w_i s_i B_i A_i`` of one module."""
    return [w * e.modules[module].delta(torch.float64) for w, e in zip(weights, experts)]


def tolerance(experts: list[LoraAdapter], module: str, weights) -> float:
    """The zero threshold of the spec: ``max(d_out, d_in) · ε · Σ_i ‖w_i s_i B_i‖_F ‖A_i‖_F``."""
    parts = [e.modules[module] for e in experts]
    bound = sum(abs(w * m.scale) * m.B.double().norm().item() * m.A.double().norm().item()
                for w, m in zip(weights, parts))
    d_out, d_in = parts[0].B.shape[0], parts[0].A.shape[1]
    return max(d_out, d_in) * torch.finfo(torch.float64).eps * bound


def make(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return get_method(name)(cfg)


def merged(name: str, experts: list[LoraAdapter], weights=None, **overrides) -> dict[str, torch.Tensor]:
    """Module -> the method's merged ΔW, weights following `experts` (default 1 each)."""
    return make(name, **overrides).merge(experts, weights or [1.0] * len(experts))




def composed(name: str, experts: list[LoraAdapter], **overrides):
    """(kind, deltas or adapter) the method composes on `FakeModel`."""
    fake = FakeModel()
    ctx = FitContext(model=fake, pool=ExpertPool("toy", experts), fit_examples=[], seed=0,
                     prompt=lambda e: e.input, score=lambda c, e: 0.0)
    list(make(name, **overrides).compose(ctx))
    return fake.applied[0]


# --------------------------------------------------------------------- the reference


def svd_top(delta: torch.Tensor, k: int, tol: float):
    """The top ``min(k, rank)`` singular triplets of a dense matrix (rank: singular values above `tol`)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(k, int((S > tol).sum()))
    return U[:, :k], S[:k], Vh[:k]


def procrustes(M: torch.Tensor) -> torch.Tensor:
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def tsv_reference(deltas: list[torch.Tensor], alpha: float, tol: float) -> torch.Tensor:
    """TSV-M from dense matrices: per task the top k = ⌊min(d)/N⌋ triplets (at most its rank), concatenated,
    U and V replaced by their orthogonal Procrustes solutions, ``α U⊥ S V⊥ᵀ``."""
    k = min(deltas[0].shape) // len(deltas)
    tops = [svd_top(d, k, tol) for d in deltas]
    U = torch.cat([u for u, _, _ in tops], dim=1)
    S = torch.diag(torch.cat([s for _, s, _ in tops]))
    V = torch.cat([vh for _, _, vh in tops], dim=0).T
    return alpha * procrustes(U) @ S @ procrustes(V).T


def official_tsv(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The official `compute_and_sum_svd_mem_reduction` on one module, transcribed (α = 1): k not bounded by rank."""
    k = int(min(deltas[0].shape) * (1 / len(deltas)))
    sum_u = sum_s = sum_v = None
    for i, vec in enumerate(deltas):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_v[i * k:(i + 1) * k, :] = v[:k, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("weights, alpha", [(None, 1.0), ([0.7, -1.3, 2.0], 1.7)])
def test_equals_the_dense_reference_on_mixed_ranks(weights, alpha):
    experts = toy_pool((2, 4, 8))
    w = weights or [1.0, 1.0, 1.0]
    got = merged("tsv", experts, weights, alpha=alpha)
    for module, delta in got.items():
        expected = tsv_reference(weighted_deltas(experts, module, w), alpha, tolerance(experts, module, w))
        close(delta, expected)


def test_equals_the_official_code_when_every_task_has_rank_k():
    """12×20 with N = 3: k = 4 ≤ every rank, the official setting (no zero singular value kept): same ΔW."""
    experts = toy_pool((4, 6, 8), seed=3)
    got = merged("tsv", experts)["v_proj"]
    close(got, official_tsv(weighted_deltas(experts, "v_proj", [1.0] * 3)))


def test_keeps_k_triplets_per_task_at_most_its_rank():
    """The output's rank is Σ_i min(k, r_i): 24×20 (k = 6): 2 + 4 + 6; 12×20 (k = 4): 2 + 4 + 4; 40×36 (k = 12): all."""
    got = merged("tsv", toy_pool((2, 4, 8)))
    ranks = {m: int(torch.linalg.matrix_rank(d)) for m, d in got.items()}
    assert ranks == {"q_proj": 12, "v_proj": 10, "o_proj": 14}


def test_one_expert_is_returned_scaled_by_alpha_and_weight():
    """One task: its triplets are already orthonormal, Procrustes changes nothing: ``α w Δ_1``."""
    (expert,) = toy_pool((4,))
    for module, delta in merged("tsv", [expert], [0.5], alpha=2.0).items():
        close(delta, expert.modules[module].delta(torch.float64))


def test_a_zero_weight_removes_its_expert():
    """A zero update has no singular directions to keep (the official code would keep k arbitrary ones): on
    40×36, where k covers every rank for N = 2 and 3, weights [1, 0, 1] merge like the two experts alone."""
    experts = toy_pool((2, 4, 8))
    close(merged("tsv", experts, [1.0, 0.0, 1.0])["o_proj"], merged("tsv", [experts[0], experts[2]])["o_proj"])
    assert all(not d.any() for d in merged("tsv", experts, [0.0, 0.0, 0.0]).values())


def test_tasks_on_orthogonal_subspaces_are_summed():
    """When the tasks' column spaces and row spaces are mutually orthogonal, there is no interference to remove:
    TSV-M is task arithmetic."""
    experts = toy_pool((2, 4, 8))
    for e, (lo, hi) in zip(experts, [(0, 2), (2, 6), (6, 14)]):
        for m in e.modules.values():  # each expert's factors on its own block of coordinates
            m.A[:, :lo] = 0
            m.A[:, hi:] = 0
            m.B[:lo] = 0
            m.B[hi:] = 0
    got = merged("tsv", experts)["o_proj"]
    close(got, sum(weighted_deltas(experts, "o_proj", [1.0] * 3)))


def test_pool_order_does_not_matter_and_weights_follow_their_experts():
    experts = toy_pool((2, 4, 8))
    weights = [0.7, -0.2, 1.1]
    first = merged("tsv", experts, weights)
    order = (2, 0, 1)
    permuted = merged("tsv", [experts[i] for i in order], [weights[i] for i in order])
    for module in first:
        close(permuted[module], first[module], rtol=1e-12)


def test_lowrank_svd_equals_the_dense_svd():
    experts = toy_pool((2, 4, 8))
    for module in TARGETS:
        parts = [e.modules[module] for e in experts]
        for m in parts:
            U, S, Vh = lowrank_svd(m.A.double()[None], (m.scale * m.B.double())[None])
            dense = m.delta(torch.float64)
            close(torch.linalg.svdvals(dense)[:m.rank], S[0])
            close((U[0] * S[0]) @ Vh[0], dense)
            close(U[0].T @ U[0], torch.eye(U.shape[2], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(24, 6), (6, 24)])
def test_procrustes_is_orthogonal_and_the_closest(shape):
    """polar(M) has orthonormal columns (rows, for wide M), equals ``M (MᵀM)^{-1/2}``, and is nearer to M than
    other orthonormal matrices."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(*shape, generator=g, dtype=torch.float64)
    Q = polar(M)
    tall = shape[0] >= shape[1]
    gram = Q.T @ Q if tall else Q @ Q.T
    close(gram, torch.eye(min(shape), dtype=torch.float64), rtol=1e-12)
    Mt = M if tall else M.T
    evals, evecs = torch.linalg.eigh(Mt.T @ Mt)
    close(Q if tall else Q.T, Mt @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T)
    for seed in range(5):
        other, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g, dtype=torch.float64))
        assert (Q - M).norm() <= ((other if tall else other.T) - M).norm()


def test_fold_false_is_a_lora_of_the_merged_delta():
    experts = toy_pool((2, 4, 8))
    kind, deltas = composed("tsv", experts)
    assert kind == "deltas"
    kind, adapter = composed("tsv", experts, fold=False, rank=14)
    assert kind == "adapter" and adapter.name == "tsv"
    for module, delta in dense_deltas(adapter, torch.float64).items():
        close(delta, deltas[module])


@pytest.mark.parametrize("field, value", [("alpha", 0.0), ("alpha", -1.0), ("alpha", "x"), ("alpha", float("nan")),
                                          ("alpha", True), ("rank", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make("tsv", **{field: value})


def test_on_the_tiny_llama_base_weights_are_restored(tiny_lm, make_pool):
    assert_composes_then_restores(tiny_lm, make_pool(3, ranks=[2, 4, 8], seed=4), make("tsv"))
