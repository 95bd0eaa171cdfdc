"""LoRA-LEGO: exactness at full rank, shrinking, k-means correctness, dual reweighting, determinism.

Everything in float64. The dual reweighting is checked against a per-cluster reference written here from the
method's definition (centroid = mean of its member units [a, s·b]; parameter reweighting rescales it to the
mean member norm; output reweighting multiplies the update by √(r / k')), on cases where k-means runs
(k < Σ r_i), to 1e-12 relative; properties of the clustering (fixed point of Lloyd's iteration, recovered
clusters, independence of unit order) are checked exactly.
"""

from __future__ import annotations

import pytest
import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from methods.linear import concat_merge, dense_deltas
from methods.lora_lego import kmeans_gram, lego_cluster, lego_merge, lego_shrink, module_units, unit_groups

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


def test_k_equal_total_rank_keeps_every_unit():
    """k ≥ Σ r: every unit is its own cluster (centroid = the unit, parameter factor 1). Without reweighting the
    merge is the exact sum; the output reweighting then scales it by √(r̄ / Σ r) = √(1 / N), r̄ = Σ r / N."""
    adapters = [adapter("a", 4, 1), adapter("b", 2, 2), adapter("c", 3, 3)]  # different ranks
    plain = lego_merge(adapters, k=9, param_reweight=False, output_reweight=False)
    reweighted = lego_merge(adapters, k=9)
    exact = exact_sum(adapters)
    for module, delta in dense_deltas(plain, torch.float64).items():
        assert plain.modules[module].rank == 9
        close(delta, exact[module])
        close(reweighted.modules[module].delta(), exact[module] * (1 / 3) ** 0.5)


def test_one_lora_at_its_own_rank_is_reproduced_up_to_order():
    a = adapter("a", 5, 4)
    for reweight in (False, True):  # k' = r: both factors are 1
        shrunk = lego_shrink(a, 5, param_reweight=reweight, output_reweight=reweight)
        for module, m in a.modules.items():
            got = shrunk.modules[module]
            close(units_sorted(got), units_sorted(m))
            close(got.delta(), m.delta())


def test_duplicate_loras_merge_to_one_copy():
    """Identical experts: k ≥ Σ r without reweighting keeps every unit (the sum, 2ΔW); k = r pairs each unit with
    its twin, the centroid is the unit itself and √(r/k) = 1, so the merge is one copy (ΔW), as an average is."""
    a = adapter("a", 3, 5)
    twin = LoraAdapter("b", "base", dict(a.modules))
    exact = exact_sum([a, twin])
    full = dense_deltas(lego_merge([a, twin], k=6, param_reweight=False, output_reweight=False), torch.float64)
    paired = dense_deltas(lego_merge([a, twin], k=3), torch.float64)
    for module in exact:
        close(full[module], exact[module])
        close(paired[module], a.modules[module].delta())


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


def reference_merge(ua: torch.Tensor, ub: torch.Tensor, assign: torch.Tensor, k: int, r: float, param_reweight: bool,
                    output_reweight: bool, norm: float) -> torch.Tensor:
    """ΔW of one module from the definition, one cluster at a time: c_j = mean of the member units [a, s·b];
    c_j ← c_j · mean ‖u‖ / ‖c_j‖ (parameter reweighting); ΔW = f · Σ_j b_j a_jᵀ with f = √(r / k) (output
    reweighting)."""
    delta = torch.zeros(ub.shape[1], ua.shape[1], dtype=torch.float64)
    for j in range(k):
        members = (assign == j).nonzero().flatten().tolist()
        if not members:
            continue
        units = [torch.cat([ua[i], ub[i]]) for i in members]
        c = sum(units) / len(units)
        if param_reweight:
            c = c * (sum(torch.linalg.vector_norm(u, norm) for u in units) / len(units)) / torch.linalg.vector_norm(c, norm)
        a, b = c[: ua.shape[1]], c[ua.shape[1]:]
        delta += torch.outer(b, a)
    return delta * ((r / k) ** 0.5 if output_reweight else 1.0)


@pytest.mark.parametrize("param_reweight, output_reweight, param_norm",
                         [(True, True, "inf"), (True, True, "2"), (True, False, "inf"), (False, True, "inf")])
def test_dual_reweighting_matches_the_definition(param_reweight, output_reweight, param_norm):
    """k < Σ r (k-means runs): each module's merged ΔW equals the reference built from its own clusters, and
    the clustering is a Lloyd fixed point (each unit nearest its centroid)."""
    adapters = [adapter(n, 4, s) for n, s in (("a", 7), ("b", 8), ("c", 9))]
    k, norm = 5, float("inf") if param_norm == "inf" else 2.0
    kwargs = dict(param_reweight=param_reweight, output_reweight=output_reweight, param_norm=param_norm)
    merged = lego_merge(adapters, k=k, seed=2, **kwargs)
    ((R, entries),) = unit_groups(adapters, torch.float64).items()  # the batch lego_merge clusters at once
    factors, stats = lego_cluster([units for _, units in entries], k, torch.Generator().manual_seed(2), n_loras=3,
                                  **kwargs)
    row = 0
    for (names, (UA, UB)), (A, B) in zip(entries, factors):
        for i, module in enumerate(names):
            ua, ub, assign = UA[i], UB[i], stats["assign"][row]
            row += 1
            units = torch.cat([ua, ub], 1)
            centroids = torch.stack([units[assign == j].mean(0) for j in range(k)])  # all non-empty here
            d = torch.cdist(units, centroids)
            close(d.gather(1, assign[:, None]).squeeze(1), d.min(1).values)
            expected = reference_merge(ua, ub, assign, k, R / 3, param_reweight, output_reweight, norm)
            close(B[i] @ A[i], expected)
            close(merged.modules[module].delta(), expected)


@pytest.mark.parametrize("param_norm", ["inf", "2"])
def test_param_reweight_only_grows_centroids_to_the_mean_member_norm(param_norm):
    adapters = [adapter(n, 4, s) for n, s in (("a", 7), ("b", 8), ("c", 9))]
    ua, ub = module_units(adapters, "layers.0.up", torch.float64)
    norm = float("inf") if param_norm == "inf" else 2.0
    results = {}
    for reweight in (False, True):
        (merged,), stats = lego_cluster([(ua[None], ub[None])], 4, torch.Generator().manual_seed(0),
                                        param_reweight=reweight, output_reweight=False, n_loras=3,
                                        param_norm=param_norm)
        results[reweight] = torch.cat([merged[0][0], merged[1][0].T], 1)  # rows [a_j, b_j]
    assign = stats["assign"][0]
    unit_norms = torch.linalg.vector_norm(torch.cat([ua, ub], 1), norm, dim=1)
    for j in range(4):
        target = unit_norms[assign == j].mean()
        close(torch.linalg.vector_norm(results[True][j], norm), target)
        assert torch.linalg.vector_norm(results[False][j], norm) <= target * (1 + 1e-12)


def test_output_reweight_shrinks_above_the_input_rank_and_is_one_at_it():
    adapters = [adapter(n, 4, s) for n, s in (("a", 10), ("b", 11), ("c", 12))]
    for k, factor in ((4, 1.0), (8, 0.5 ** 0.5)):
        on = dense_deltas(lego_merge(adapters, k=k, seed=1), torch.float64)
        off = dense_deltas(lego_merge(adapters, k=k, seed=1, output_reweight=False), torch.float64)
        for module in on:
            close(on[module], off[module] * factor)


def test_result_does_not_depend_on_the_order_of_units_inside_a_lora():
    """Permuting the ranks of one LoRA (A's rows and B's columns together) leaves its ΔW unchanged, and LEGO's
    merge too, bit for bit, at the default k (k-means runs: R = 12 units into 4 clusters)."""
    adapters = [adapter(n, 4, s) for n, s in (("a", 13), ("b", 14), ("c", 15))]
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = LoraAdapter("b", "base", {m: LoraModule(x.A[perm], x.B[:, perm], x.scale)
                                         for m, x in adapters[1].modules.items()})
    first = lego_merge(adapters, seed=3)
    other = lego_merge([adapters[0], shuffled, adapters[2]], seed=3)
    for module in first.modules:
        assert torch.equal(first.modules[module].delta(), other.modules[module].delta())


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
