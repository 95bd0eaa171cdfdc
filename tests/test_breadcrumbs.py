"""`method=breadcrumbs` against a float64 reference written here from Model Breadcrumbs and mergekit's definitions
(a6e4028: `magnitude_outliers`, `rescaled_masked_tensor`, `GTATask`, `get_mask`): whole-delta magnitude ranks by
explicit sorting, the two cut-offs, and the combination entry by entry (`test_della.ref_combine`). Then the
mask's properties (exactly ⌊density·numel⌋ entries kept, all between the two cut-offs), pool order, weights,
output and config errors.

Tolerances as in `tests/test_della.py`: rtol 1e-12 against the reference, bit equality between runs.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter
from bench.registry import get_method
from conftest import CONF
from methods.breadcrumbs import outlier_masks
from methods.linear import dense_deltas
from test_della import experts, ref_combine
from test_merges import FakePipeline, close, context


def make(**overrides):
    cfg = OmegaConf.load(CONF / "method" / "breadcrumbs.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return get_method("breadcrumbs")(cfg)


def ref_kept(delta: torch.Tensor, density: float, gamma: float) -> set[int]:
    """Flat indices kept: magnitudes sorted ascending (ties by position); drop the ⌊γ n⌋ largest and the smallest
    so that ⌊d n⌋ remain (fewer largest when ⌊d n⌋ + ⌊γ n⌋ > n)."""
    flat = delta.flatten().tolist()
    n = len(flat)
    order = sorted(range(n), key=lambda j: (abs(flat[j]), j))
    target, n_top = int(density * n), int(gamma * n)
    n_top = min(n_top, n - target)
    n_bot = n - target - n_top
    return set(order[n_bot:n - n_top])


def ref_prune(delta: torch.Tensor, density: float, gamma: float, rescale: str) -> torch.Tensor:
    if density >= 1:
        return delta
    kept = ref_kept(delta, density, gamma)
    mask = torch.tensor([j in kept for j in range(delta.numel())], dtype=delta.dtype).view(delta.shape)
    if rescale == "l1":
        return delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    return delta * mask


@pytest.mark.parametrize("combination", ["linear", "ties"])
@pytest.mark.parametrize("rescale", ["none", "l1"])
@pytest.mark.parametrize("normalize", [None, True])
@pytest.mark.parametrize("density, gamma", [(0.6, 0.05), (0.9, 0.2), (0.5, 0.0)])
def test_equals_the_reference(combination, rescale, normalize, density, gamma):
    pool = experts()
    weights = [0.9, -0.4, 1.3]
    method = make(combination=combination, rescale=rescale, normalize=normalize, density=density, gamma=gamma,
                  **{"lambda": 0.7})
    merged = method.merge(pool[::-1], weights[::-1])
    for module, ours in merged.items():
        pruned = [ref_prune(a.modules[module].delta(), density, gamma, rescale) for a in pool]
        close(ours, ref_combine(pruned, weights, combination == "ties", bool(normalize), 0.7))


@pytest.mark.parametrize("density, gamma", [(0.6, 0.05), (0.3, 0.01), (0.9, 0.2), (0.5, 0.0), (0.999, 0.5)])
def test_keeps_exactly_the_entries_between_the_cutoffs(density, gamma):
    deltas = torch.stack([a.modules["q_proj"].delta() for a in experts()])
    masks = outlier_masks(deltas, density, gamma)
    n = deltas[0].numel()
    target = int(density * n)
    n_top = min(int(gamma * n), n - target)
    for delta, mask in zip(deltas, masks):
        assert int(mask.sum()) == target
        kept, dropped = delta.abs()[mask], delta.abs()[~mask]
        above = dropped[dropped > kept.max()]
        assert len(above) == n_top  # the outliers, all larger than anything kept
        assert (dropped[dropped <= kept.max()] < kept.min()).all()  # the rest, all smaller
        assert set(mask.flatten().nonzero().flatten().tolist()) == ref_kept(delta, density, gamma)


def test_density_one_keeps_everything_outliers_too():
    pool = experts()
    merged = make(density=1.0, gamma=0.3).merge(pool, [1.0, 1.0, 1.0])
    for module, ours in merged.items():
        close(ours, sum(a.modules[module].delta() for a in pool))


# --------------------------------------------------------------------- order, weights, output


def composed(pool: list[LoraAdapter], **overrides) -> dict[str, torch.Tensor]:
    fake = FakePipeline()
    list(make(**overrides).compose(context(fake, pool)))
    kind, what = fake.applied[0]
    return what if kind == "deltas" else dense_deltas(what, torch.float64)


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_pool_order_does_not_matter_and_weights_follow_experts(combination):
    pool = experts((4, 2, 3, 5))
    weights = [0.7, -0.2, 1.1, 0.4]
    order = (2, 0, 3, 1)
    first = composed(pool, combination=combination, weights=weights)
    permuted = composed([pool[i] for i in order], combination=combination, weights=[weights[i] for i in order])
    by_name = composed([pool[i] for i in order], combination=combination,
                       weights={f"e{i}": w for i, w in enumerate(weights)})
    for module in first:
        assert torch.equal(permuted[module], first[module])
        assert torch.equal(by_name[module], first[module])


@pytest.mark.parametrize("combination", ["linear", "ties"])
def test_one_expert_with_density_one_is_that_expert(combination):
    (expert,) = experts((3,))
    merged = composed([expert], combination=combination, density=1.0)
    for module, m in expert.modules.items():
        close(merged[module], m.delta())


def test_not_seeded_and_lora_output_of_rank_max_ri():
    assert not make().uses_seed()
    pool = experts()
    fake = FakePipeline()
    (out,) = list(make(fold=False).compose(context(fake, pool)))
    assert set(out.adapter.ranks) == {4}
    folded, full = composed(pool), composed(pool, fold=False, rank=20)
    for module in folded:
        close(full[module], folded[module], rtol=1e-10)


@pytest.mark.parametrize("field, value", [
    ("gamma", -0.1), ("gamma", 1.5), ("gamma", "x"), ("density", 0.0), ("density", 2.0), ("combination", "slerp"),
    ("rescale", "probability"), ("normalize", 1), ("lambda", None), ("rank", -1),
])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make(**{field: value})
