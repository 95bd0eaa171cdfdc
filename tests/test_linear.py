"""Linear arithmetic equals the base with all experts active at the given weights (peft multi-adapter)."""

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from conftest import peft_holding, random_adapter
from methods.linear import LinearArithmetic, concat_merge, dense_deltas, resolve_weights, svd_refactor

IDS = torch.tensor([[3, 99, 1024, 5, 77, 12]])


def peft_all_active(lm, adapters, weights):
    """Logits of a peft model holding every adapter (B scaled by its weight) with all of them active."""
    peft_model = peft_holding(lm.model, adapters, weights)
    peft_model.base_model.set_adapter([a.name for a in adapters])
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits
    lm.model = peft_model.unload()
    return logits


def logits_with(lm, adapter=None, fold=False):
    if adapter is None:
        with torch.no_grad():
            return lm.model(input_ids=IDS).logits
    ctx = lm.deltas_folded(dense_deltas(adapter)) if fold else lm.adapter_applied(adapter)
    with ctx, torch.no_grad():
        return lm.model(input_ids=IDS).logits


@pytest.mark.parametrize("weights", [None, [0.7, -0.2, 1.3]])
def test_linear_equals_all_experts_active(tiny_lm, make_pool, weights):
    pool = make_pool(3, ranks=[4, 2, 3])
    w = resolve_weights(weights, pool, normalize=False)
    merged = concat_merge(list(pool), w)
    expected = peft_all_active(tiny_lm, list(pool), w)
    assert {m.rank for m in merged.modules.values()} == {9}
    torch.testing.assert_close(logits_with(tiny_lm, merged), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_with(tiny_lm, merged, fold=True), expected, rtol=1e-5, atol=1e-5)


def test_linear_exact_sum_in_float64(make_pool):
    pool = make_pool(3, ranks=[4, 2, 3]).to(torch.float64)
    w = [0.5, 0.25, -1.0]
    merged = concat_merge(list(pool), w)
    for name in pool.module_names:
        exact = sum(wi * a.modules[name].scale * a.modules[name].B @ a.modules[name].A for wi, a in zip(w, pool))
        torch.testing.assert_close(merged.modules[name].delta(), exact, rtol=1e-12, atol=1e-12)


def test_single_expert_weight_one_is_that_expert(tiny_lm, make_pool):
    pool = make_pool(1)
    merged = concat_merge(list(pool), [1.0])
    torch.testing.assert_close(logits_with(tiny_lm, merged), logits_with(tiny_lm, pool[0]), rtol=1e-6, atol=1e-6)


def test_linear_method_options(tiny_lm, make_pool):
    pool = make_pool(2)
    cfg = OmegaConf.create({"name": "linear", "weights": {"e0": 2.0, "e1": 2.0}, "normalize": True, "lambda": 0.5,
                            "fold": False, "rank": None})
    merged = LinearArithmetic(cfg).merge(pool)
    assert merged.metadata["weights"] == [0.5, 0.5]
    reference = concat_merge(list(pool), [0.25, 0.25])
    for name in pool.module_names:
        torch.testing.assert_close(merged.modules[name].delta(), reference.modules[name].delta())
    with pytest.raises(ConfigError, match="unknown experts"):
        resolve_weights({"nope": 1.0}, pool, False)
    with pytest.raises(ConfigError, match="2 experts"):
        resolve_weights([1.0], pool, False)
    with pytest.raises(ConfigError, match="rank"):
        LinearArithmetic(OmegaConf.create({"name": "linear", "rank": 0}))


def test_svd_refactor_is_best_rank_k(make_pool):
    pool = make_pool(3).to(torch.float64)
    merged = concat_merge(list(pool), [1 / 3] * 3)
    full = svd_refactor(merged, rank=12)
    low = svd_refactor(merged, rank=2)
    for name in pool.module_names:
        dense = merged.modules[name].delta()
        torch.testing.assert_close(full.modules[name].delta(), dense, rtol=1e-10, atol=1e-10)
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(low.modules[name].delta(), best, rtol=1e-8, atol=1e-10)


def test_linear_on_t5(tiny_t5):
    """The same merge on an encoder-decoder model (peft target names q, v)."""
    adapters = [random_adapter(tiny_t5.model, f"t{i}", tiny_t5.model_id, targets=("q", "v"), seed=i) for i in range(2)]
    merged = concat_merge(adapters, [0.5, 0.5])
    ids = torch.tensor([[10, 20, 30, 1]])
    dec = torch.tensor([[0, 40, 50]])
    with tiny_t5.adapter_applied(merged), torch.no_grad():
        got = tiny_t5.model(input_ids=ids, decoder_input_ids=dec).logits
    deltas = {}
    for name in adapters[0].modules:
        deltas[name] = sum(0.5 * a.modules[name].delta() for a in adapters)
    with tiny_t5.deltas_folded(deltas), torch.no_grad():
        expected = tiny_t5.model(input_ids=ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
