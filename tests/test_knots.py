"""`method=knots` against a float64 reference written from the paper's equations and the official code's semantics
(gstoica27/KnOTS: `SVDMerger.apply_svd` / `merge`, `masking_ops.ties_masking` / `masked_merge`): the dense SVD
of the explicit concatenation ``[Δ_1 … Δ_N]``, components with σ > 1e-5, ``R_i = diag(σ) V_iᵀ``, TIES keeping
the ``⌊density·numel⌋ + 1`` largest magnitudes, the sign of the sum (zero: the majority sign), the mean of the
agreeing entries, ``ΔW = U · merged``. The adapters are peft-style LoRAs of mixed ranks 2, 4, 8 whose
singular values are far above 1e-5 and whose null directions are at rounding level, so the official absolute
cut and the method's numerical-rank cut keep the same components. Tolerances: 1e-10 × the largest entry.
"""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.registry import get_method
from conftest import CONF, random_adapter
from methods.base import FitContext
from conftest import RecordingModel as FakeModel
from conftest import shuffle_ranks

MODEL = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(20, 24), "v_proj": torch.nn.Linear(10, 12)})  # Σr > d on v


def experts(ranks=(2, 4, 8), seed: int = 0) -> list[LoraAdapter]:
    return [random_adapter(MODEL, f"e{i}", "base", rank=r, alpha=8.0, seed=seed + i, dtype=torch.float64)
            for i, r in enumerate(ranks)]


def make(name: str = "knots", **overrides):
    cfg = OmegaConf.load(CONF / "method" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return get_method(name)(cfg)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


# --------------------------------------------------------------------- the reference, from the equations


def official_ties(reps: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """`ties_masking` + `masked_merge('mean')`, with each expert's weight in the mean (the official code scales
    every expert by one `scaling_coeffs`)."""
    rows = torch.stack([r.flatten() for r in reps])
    if density < 1.0:
        keep = int(rows.shape[1] * density) + 1  # kthvalue(d - ⌊d·K⌋) keeps one more than ⌊d·K⌋
        tau = rows.abs().sort(dim=1, descending=True).values[:, keep - 1:keep]
        rows = rows * (rows.abs() >= tau)
    sign = rows.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    selected = torch.where(sign > 0, rows > 0, rows < 0)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    merged = (w * rows * selected).sum(0) / selected.sum(0).clamp(min=1)
    return merged.view(reps[0].shape)


def reference(adapters: list[LoraAdapter], weights: list[float], merger: str, density: float = 1.0,
              alpha: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for module in adapters[0].modules:
        deltas = [a.modules[module].delta(torch.float64) for a in adapters]
        d_in = deltas[0].shape[1]
        U, s, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        keep = s > 1e-5
        sV = torch.diag(s[keep]) @ Vh[keep]
        reps = [sV[:, i * d_in:(i + 1) * d_in] for i in range(len(adapters))]
        if merger == "ties":
            merged = official_ties(reps, weights, density)
        else:
            merged = sum(w * r for w, r in zip(weights, reps))
        out[module] = alpha * U[:, keep] @ merged
    return out


# --------------------------------------------------------------------- the method against it


@pytest.mark.parametrize("merger, density", [("ties", 0.2), ("ties", 0.5), ("ties", 1.0), ("linear", 0.2)])
@pytest.mark.parametrize("weights, alpha", [([1.0, 1.0, 1.0], 0.6), ([0.7, 1.3, 0.4], 1.0)])
def test_equals_the_reference_on_mixed_ranks(merger, density, weights, alpha):
    pool = experts()
    got = make(merger=merger, density=density, alpha=alpha).merge(pool, weights)
    expected = reference(pool, weights, merger, density, alpha)
    for module in expected:
        close(got[module], expected[module])


def test_linear_is_exactly_task_arithmetic():
    pool, weights = experts(), [0.5, -1.5, 2.0]
    got = make(merger="linear").merge(pool, weights)
    for module, delta in got.items():
        close(delta, sum(w * a.modules[module].delta() for w, a in zip(weights, pool)), 1e-12)


def test_ties_trims_each_representation_to_the_official_count():
    """One expert at density 0.3: the merge is its trimmed R_1 mapped back, so ``Uᵀ ΔW`` has ⌊0.3·numel⌋ + 1
    nonzero entries (``U`` has orthonormal columns)."""
    (expert,) = experts((4,))
    got = make(density=0.3).merge([expert], [1.0])
    for module, delta in got.items():
        U, s, _ = torch.linalg.svd(expert.modules[module].delta(), full_matrices=False)
        rep = U[:, s > 1e-5].T @ delta
        assert int((rep.abs() > 1e-12).sum()) == int(rep.numel() * 0.3) + 1


@pytest.mark.parametrize("merger", ["ties", "linear"])
def test_pool_order_and_rank_order_do_not_matter_and_weights_follow_their_experts(merger):
    pool, weights, order = experts((2, 4, 8, 4)), [0.7, -0.2, 1.1, 0.4], (2, 0, 3, 1)
    method = make(merger=merger, density=0.3)
    first = method.merge(pool, weights)
    permuted = method.merge([shuffle_ranks(pool[i], seed=i) for i in order], [weights[i] for i in order])
    swapped = method.merge(pool, [weights[i] for i in order])  # weights no longer on their experts
    for module in first:
        close(permuted[module], first[module])
        assert not torch.allclose(swapped[module], first[module])


@pytest.mark.parametrize("merger, density", [("linear", 0.2), ("ties", 1.0)])
def test_one_expert_comes_back(merger, density):
    (expert,) = experts((4,))
    got = make(merger=merger, density=density).merge([expert], [1.0])
    for module, m in expert.modules.items():
        close(got[module], m.delta())


def test_zero_updates_merge_to_zero():
    pool = [LoraAdapter(a.name, a.base_model, {k: LoraModule(m.A, torch.zeros_like(m.B), m.scale)
                                               for k, m in a.modules.items()}) for a in experts()]
    for delta in make().merge(pool, [1.0] * 3).values():
        assert torch.equal(delta, torch.zeros_like(delta))


@pytest.mark.parametrize("field, value", [("merger", "slerp"), ("density", 0.0), ("density", 1.5), ("density", "x"),
                                          ("alpha", 0.0), ("alpha", "big"), ("rank", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"method.{field}="):
        make(**{field: value})


@pytest.mark.parametrize("fold", [True, False])
def test_compose_folds_the_merge_or_refactorizes_it_to_a_lora(fold):
    pool = experts()
    fake = FakeModel()
    ctx = FitContext(model=fake, pool=ExpertPool("base", pool), fit_examples=[], seed=0, prompt=lambda e: e.input,
                     score=lambda c, e: 0.0)
    method = make(fold=fold)
    (composed,) = list(method.compose(ctx))
    kind, what = fake.applied[0]
    expected = reference(pool, [1.0] * 3, "ties", 0.2)
    if fold:
        assert kind == "deltas" and composed.adapter is None
        for module in expected:
            close(what[module], expected[module])
    else:
        assert kind == "adapter" and what.ranks == {8}  # rank null: the largest expert rank
        assert not method.uses_seed()
