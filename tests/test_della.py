"""`method=della` against a float64 reference written here from the DELLA paper and mergekit's definitions
(a6e4028: `della_magprune`, `rescaled_masked_tensor`, `GTATask`, `get_mask`; 1/k rescale as in the paper and
mergekit 619f4e4): per-row magnitude ranks by explicit sorting, the same generator draws, and the combination
entry by entry. Then MAGPRUNE's properties (keep probabilities monotone in magnitude with mean `density`; the
rescaled delta unbiased over many draws), pool order, weights, output and config errors.

Tolerances: the reference sums in Python floats, the method in tensor ops: rtol 1e-12 (atol 1e-12 × the largest
entry); runs of the method that compute the same thing (a permuted pool, a repeated seed) are bit-equal.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter
from bench.registry import get_method
from conftest import CONF, random_adapter
from methods.della import keep_probabilities, magprune
from methods.linear import dense_deltas
from methods.ops.merge_ops import module_seed
from test_merges import FakePipeline, close, context


class Tiny(torch.nn.Module):
    """Two target layers: q_proj 24×20, v_proj 16×20."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(20, 24)
        self.v_proj = torch.nn.Linear(20, 16)


def experts(ranks=(4, 2, 3), seed: int = 0) -> list[LoraAdapter]:
    """Adapters of mixed ranks, named e0, e1, … (their name order)."""
    model = Tiny()
    return [random_adapter(model, f"e{i}", "base", rank=r, seed=seed * 100 + i, dtype=torch.float64)
            for i, r in enumerate(ranks)]


def make(**overrides):
    cfg = OmegaConf.load(CONF / "method" / "della.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return get_method("della")(cfg)


# --------------------------------------------------------------------- the reference


def ref_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per row: rank the magnitudes ascending (ties by position), map ranks 1…n linearly onto [d − ε, d + ε]."""
    d_out, d_in = delta.shape
    probs = torch.empty_like(delta)
    for row in range(d_out):
        order = sorted(range(d_in), key=lambda j: (abs(delta[row, j].item()), j))
        for rank, j in enumerate(order, start=1):
            probs[row, j] = (density - epsilon) + (rank - 1) / (d_in - 1) * 2 * epsilon
    return probs


def ref_combine(pruned: list[torch.Tensor], weights: list[float], ties: bool, normalize: bool,
                lam: float) -> torch.Tensor:
    """mergekit's GTATask entry by entry: sum of w_i δ_i (over those whose sign equals the sign of Σ w_i δ_i, +1
    at 0, for ties), divided by the sum of the weights taken part (0 → 1) when normalizing, times λ."""
    out = torch.empty_like(pruned[0])
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            vals = [w * p[r, c].item() for w, p in zip(weights, pruned)]
            if ties:
                sign = 1.0 if sum(vals) >= 0 else -1.0
                part = [i for i, v in enumerate(vals) if v * sign > 0]
                total, divisor = sum(vals[i] for i in part), sum(weights[i] for i in part)
                divisor = divisor if divisor != 0 else 1.0
            else:
                total, divisor = sum(vals), sum(weights)
                divisor = divisor if abs(divisor) >= 1e-8 else 1.0
            out[r, c] = lam * (total / divisor if normalize else total)
    return out


def ref_della(deltas: list[torch.Tensor], weights: list[float], generator: torch.Generator, density: float,
              epsilon: float, rescale: str, ties: bool, normalize: bool, lam: float) -> torch.Tensor:
    pruned = []
    for delta in deltas:  # name order: one Bernoulli draw per expert
        if density >= 1:
            pruned.append(delta)
            continue
        k = ref_keep_probabilities(delta, density, epsilon)
        m = torch.bernoulli(k, generator=generator)
        if rescale == "probability":
            pruned.append(delta * m / k)
        elif rescale == "l1":
            pruned.append(delta * m * (delta.abs().sum() / (delta * m).abs().sum()))
        else:
            pruned.append(delta * m)
    return ref_combine(pruned, weights, ties, normalize, lam)


@pytest.mark.parametrize("combination", ["ties", "linear"])
@pytest.mark.parametrize("rescale", ["probability", "l1", "none"])
@pytest.mark.parametrize("normalize", [None, True, False])
def test_equals_the_reference(combination, rescale, normalize):
    pool = experts()
    weights = [0.9, -0.4, 1.3]
    method = make(combination=combination, rescale=rescale, normalize=normalize, density=0.4, epsilon=0.2,
                  **{"lambda": 0.7})
    merged = method.merge(pool[::-1], weights[::-1], seed=5)
    norm = (combination == "ties") if normalize is None else normalize
    for module, ours in merged.items():
        g = torch.Generator().manual_seed(module_seed(5, module))
        ref = ref_della([a.modules[module].delta() for a in pool], weights, g, 0.4, 0.2, rescale,
                        combination == "ties", norm, 0.7)
        close(ours, ref)


@pytest.mark.parametrize("combination", ["ties", "linear"])
def test_density_one_prunes_nothing(combination):
    pool = experts()
    weights = [0.5, 1.0, 2.0]
    merged = make(combination=combination, density=1.0).merge(pool, weights, seed=1)
    for module, ours in merged.items():
        deltas = [a.modules[module].delta() for a in pool]
        close(ours, ref_combine(deltas, weights, combination == "ties", combination == "ties", 1.0))


# --------------------------------------------------------------------- MAGPRUNE's properties


def test_keep_probabilities_rise_with_magnitude_and_average_density():
    deltas = torch.stack([a.modules["q_proj"].delta() for a in experts()])
    keep = keep_probabilities(deltas, 0.4, 0.2)
    for i, delta in enumerate(deltas):
        close(keep[i], ref_keep_probabilities(delta, 0.4, 0.2))
    by_magnitude = keep.gather(-1, deltas.abs().argsort(dim=-1))
    assert (by_magnitude.diff(dim=-1) > 0).all()  # strictly increasing along each row
    close(by_magnitude[..., 0], torch.full_like(by_magnitude[..., 0], 0.2))
    close(by_magnitude[..., -1], torch.full_like(by_magnitude[..., -1], 0.6))
    close(keep.mean(-1), torch.full(keep.shape[:-1], 0.4, dtype=keep.dtype))


def test_rescaled_delta_is_unbiased_and_masks_follow_the_probabilities():
    """Over T draws of one delta: keep frequencies match k and the mean of m δ / k matches δ (z-scores < 5)."""
    delta = experts()[0].modules["q_proj"].delta()
    draws = 4000
    pruned = magprune(delta.expand(draws, -1, -1).clone(), 0.5, 0.15, "probability", torch.Generator().manual_seed(0))
    k = ref_keep_probabilities(delta, 0.5, 0.15)
    freq = (pruned != 0).double().mean(0)
    assert ((freq - k).abs() / (k * (1 - k) / draws).sqrt()).max() < 5
    sd = delta.abs() * ((1 - k) / (k * draws)).sqrt()
    assert ((pruned.mean(0) - delta).abs() / sd).max() < 5
    assert abs(freq.mean().item() - 0.5) < 0.01


def test_l1_rescale_keeps_each_delta_l1_norm():
    deltas = torch.stack([a.modules["q_proj"].delta() for a in experts()])
    pruned = magprune(deltas.clone(), 0.3, 0.1, "l1", torch.Generator().manual_seed(1))
    assert ((pruned != 0).sum((1, 2)) < deltas[0].numel()).all()
    close(pruned.abs().sum((1, 2)), deltas.abs().sum((1, 2)))


# --------------------------------------------------------------------- order, weights, seed, output


def composed(pool: list[LoraAdapter], seed: int = 2, **overrides) -> dict[str, torch.Tensor]:
    fake = FakePipeline()
    list(make(**overrides).compose(context(fake, pool, seed=seed)))
    kind, what = fake.applied[0]
    return what if kind == "deltas" else dense_deltas(what, torch.float64)


def test_pool_order_does_not_matter_and_weights_follow_experts():
    pool = experts((4, 2, 3, 5))
    weights = [0.7, -0.2, 1.1, 0.4]
    order = (2, 0, 3, 1)
    first = composed(pool, weights=weights)
    permuted = composed([pool[i] for i in order], weights=[weights[i] for i in order])
    by_name = composed([pool[i] for i in order], weights={f"e{i}": w for i, w in enumerate(weights)})
    for module in first:
        assert torch.equal(permuted[module], first[module])
        assert torch.equal(by_name[module], first[module])


def test_seeded():
    method = make()
    assert method.uses_seed()
    pool = experts()
    first, again, other = (method.merge(pool, [1.0] * 3, seed=s) for s in (3, 3, 4))
    for module in first:
        assert torch.equal(first[module], again[module])
        assert not torch.equal(first[module], other[module])


@pytest.mark.parametrize("combination", ["ties", "linear"])
def test_one_expert_with_density_one_is_that_expert(combination):
    (expert,) = experts((3,))
    merged = composed([expert], combination=combination, density=1.0)
    for module, m in expert.modules.items():
        close(merged[module], m.delta())


def test_lora_output_has_rank_max_ri_and_full_rank_is_exact():
    pool = experts()
    folded = composed(pool)
    fake = FakePipeline()
    (out,) = list(make(fold=False).compose(context(fake, pool, seed=2)))
    assert set(out.adapter.ranks) == {4}
    full = composed(pool, fold=False, rank=20)
    for module in folded:
        close(full[module], folded[module], rtol=1e-10)


# --------------------------------------------------------------------- config errors


@pytest.mark.parametrize("field, value", [
    ("epsilon", 0.5), ("epsilon", 0.6), ("epsilon", -0.1), ("epsilon", "x"), ("density", 0.0), ("density", 1.5),
    ("combination", "dare"), ("rescale", "l2"), ("normalize", "yes"), ("lambda", "x"), ("rank", 0),
])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make(**{field: value})


def test_epsilon_is_free_at_density_one():
    make(density=1.0, epsilon=0.5)  # mergekit: density 1 prunes nothing, epsilon unused
