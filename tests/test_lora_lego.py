"""LoRA-LEGO: exactness at full rank, shrinking, k-means correctness, dual reweighting, determinism.

Everything in float64. Where the merge is an exact re-assembly of units (k ≥ Σ r_i, one LoRA at k = r)
we ask for 1e-12 relative agreement (the reweighting factors are 1 up to rounding); properties of the
clustering (fixed point of Lloyd's iteration, recovered clusters) are checked exactly.
"""

from __future__ import annotations

import pytest
import torch

from bench.adapters import LoraAdapter, LoraModule
from bench.errors import ConfigError
from methods.linear import concat_merge, dense_deltas
from methods.lora_lego import kmeans_gram, lego_cluster, lego_merge, lego_shrink, module_units

SHAPES = {"layers.0.q": (12, 10), "layers.0.up": (16, 10), "layers.1.q": (12, 10), "layers.1.up": (16, 10)}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def adapter(name: str, rank: int = 4, seed: int = 0, shapes=SHAPES) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    modules = {m: LoraModule(torch.randn(rank, d_in, generator=g, dtype=torch.float64),
                             torch.randn(d_out, rank, generator=g, dtype=torch.float64), 8.0 / rank)
               for m, (d_out, d_in) in shapes.items()}
    return LoraAdapter(name, "base", modules)


def exact_sum(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    return dense_deltas(concat_merge(adapters, [1.0] * len(adapters)), torch.float64)


def units_sorted(m: LoraModule) -> torch.Tensor:
    """The rank-1 units [a, s·b] of a module as rows, in a canonical (lexicographic) order."""
    u = torch.cat([m.A, (m.scale * m.B).T], dim=1)
    for col in reversed(range(u.shape[1])):
        u = u[torch.argsort(u[:, col], stable=True)]
    return u


# --------------------------------------------------------------------- exact re-assembly


@pytest.mark.parametrize("reweight", [False, True])
def test_k_equal_total_rank_reproduces_the_exact_sum(reweight):
    adapters = [adapter("a", 4, 1), adapter("b", 2, 2), adapter("c", 3, 3)]  # different ranks
    merged = lego_merge(adapters, k=9, param_reweight=reweight, output_reweight=reweight)
    exact = exact_sum(adapters)
    for module, delta in dense_deltas(merged, torch.float64).items():
        assert merged.modules[module].rank == 9
        close(delta, exact[module])


def test_one_lora_at_its_own_rank_is_reproduced_up_to_order():
    a = adapter("a", 5, 4)
    for reweight in (False, True):
        shrunk = lego_shrink(a, 5, param_reweight=reweight, output_reweight=reweight)
        for module, m in a.modules.items():
            got = shrunk.modules[module]
            close(units_sorted(got), units_sorted(m))
            close(got.delta(), m.delta())


def test_duplicate_loras_stay_exact():
    """Identical experts: k ≥ Σ r keeps every unit; k = r pairs the duplicates and the output reweighting
    restores the sum's norm, which here is exactly the sum (same direction)."""
    a = adapter("a", 3, 5)
    twin = LoraAdapter("b", "base", dict(a.modules))
    exact = exact_sum([a, twin])
    full = dense_deltas(lego_merge([a, twin], k=6, param_reweight=False, output_reweight=False), torch.float64)
    paired = dense_deltas(lego_merge([a, twin], k=3), torch.float64)
    for module in exact:
        close(full[module], exact[module])
        close(paired[module], exact[module])


def test_more_clusters_than_distinct_units_is_deterministic():
    """Three copies of one LoRA with k = r + 1: k-means++ runs out of distinct points (falls back to the
    next unchosen one); the spare cluster ends empty and adds nothing."""
    a = adapter("a", 3, 6)
    copies = [LoraAdapter(n, "base", dict(a.modules)) for n in ("x", "y", "z")]
    merged = lego_merge(copies, k=4, param_reweight=False, output_reweight=False, seed=1)
    again = lego_merge(copies, k=4, param_reweight=False, output_reweight=False, seed=1)
    for module, m in a.modules.items():
        close(merged.modules[module].delta(), m.delta())
        assert torch.equal(merged.modules[module].A, again.modules[module].A)


# --------------------------------------------------------------------- the clustering


def test_kmeans_with_k_equal_points_gives_each_point_its_own_cluster():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(5, 7, 6, generator=g, dtype=torch.float64)
    assign, _ = kmeans_gram(U @ U.transpose(1, 2), 7)
    for row in assign:
        assert sorted(row.tolist()) == list(range(7))


def test_lloyd_result_is_a_fixed_point():
    """Each unit ends at its nearest centroid, and each centroid is the mean of its members."""
    g = torch.Generator().manual_seed(1)
    U = torch.randn(6, 40, 9, generator=g, dtype=torch.float64)
    assign, iterations = kmeans_gram(U @ U.transpose(1, 2), 5, torch.Generator().manual_seed(2), max_iter=200)
    assert 1 <= iterations < 200
    for u, a in zip(U, assign):
        centroids = torch.stack([u[a == j].mean(0) for j in range(5)])  # all clusters non-empty here
        d = torch.cdist(u, centroids)
        close(d.gather(1, a[:, None]).squeeze(1), d.min(1).values)  # nearest (equal distances allowed)


def test_well_separated_units_are_recovered_batched_over_modules():
    """Three LoRAs whose rank j units are noisy copies of one prototype: k = r groups them by j, in every
    module of the batch at once."""
    g = torch.Generator().manual_seed(3)
    groups = []
    for _ in range(2):  # two module shapes, same unit count
        proto_a, proto_b = torch.randn(4, 4, 10, generator=g), torch.randn(4, 4, 12, generator=g)
        noise = lambda t: t + 0.01 * torch.randn(t.shape, generator=g)  # noqa: E731
        ua = torch.cat([noise(proto_a) for _ in range(3)], dim=1).double()  # (4 modules, 3·4 units, d_in)
        ub = torch.cat([noise(proto_b) for _ in range(3)], dim=1).double()
        groups.append((ua, ub))
    _, stats = lego_cluster(groups, 4, torch.Generator().manual_seed(0))
    truth = torch.arange(12) % 4
    for assign in stats["assign"]:
        # same partition as the truth, up to cluster labels
        assert all(len(set(assign[truth == j].tolist())) == 1 for j in range(4))
        assert len(set(assign.tolist())) == 4


def test_param_reweight_gives_centroids_the_mean_member_norm():
    adapters = [adapter(n, 4, s) for n, s in (("a", 7), ("b", 8), ("c", 9))]
    module = "layers.0.up"
    ua, ub = module_units(adapters, module, torch.float64)
    (merged,), stats = lego_cluster([(ua[None], ub[None])], 4, torch.Generator().manual_seed(0),
                                    param_reweight=True, output_reweight=False)
    A, B = merged[0][0], merged[1][0]
    assign = stats["assign"][0]
    unit_norms = torch.cat([ua, ub], dim=1).norm(dim=1)
    for j in range(4):
        members = assign == j
        close(torch.cat([A[j], B[:, j]]).norm(), unit_norms[members].mean())


def test_output_reweight_matches_the_exact_sum_norm():
    adapters = [adapter(n, 4, s) for n, s in (("a", 10), ("b", 11), ("c", 12))]
    merged = dense_deltas(lego_merge(adapters, k=3), torch.float64)
    plain = dense_deltas(lego_merge(adapters, k=3, output_reweight=False), torch.float64)
    for module, exact in exact_sum(adapters).items():
        close(merged[module].norm(), exact.norm())
        cos = torch.nn.functional.cosine_similarity(merged[module].flatten(), plain[module].flatten(), dim=0)
        close(cos, torch.ones((), dtype=torch.float64))  # one factor per module: direction unchanged


# --------------------------------------------------------------------- API behaviour


def test_seeded_and_independent_of_pool_order():
    adapters = [adapter(n, 4, s) for n, s in (("a", 13), ("b", 14), ("c", 15))]
    first = lego_merge(adapters, k=4, seed=3)
    again = lego_merge(adapters, k=4, seed=3)
    permuted = lego_merge(adapters[::-1], k=4, seed=3)
    for module in first.modules:
        for other in (again, permuted):
            assert torch.equal(first.modules[module].A, other.modules[module].A)
            assert torch.equal(first.modules[module].B, other.modules[module].B)


def test_different_ranks_default_k_and_shrink():
    adapters = [adapter("a", 4, 16), adapter("b", 2, 17), adapter("c", 6, 18)]
    merged = lego_merge(adapters)
    assert merged.ranks == {6} and merged.metadata["k"] == 6
    shrunk = lego_shrink(adapters[2], 2)
    assert shrunk.ranks == {2} and set(shrunk.modules) == set(SHAPES)
    assert shrunk.modules["layers.0.q"].A.dtype == torch.float64


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(ConfigError, match="method.k="):
        lego_merge([adapter("a")], k=k)
