"""LoraHub: composition semantics, in-place candidate evaluation, the search, and the method."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import AdapterError, ConfigError
from bench.lora.adapters import LoraAdapter
from methods.base import FitContext
from methods.lorahub import (
    LoraHub,
    LoraHubProblem,
    compose_exact,
    compose_official,
    factor_layers,
    lorahub_search,
)
from tasks.algorithmic import generate
from tests.conftest import encode_prompts

FIT = [generate("boolean_expressions", "fit", i) for i in range(5)]
INPUTS = [f"Q: {e.input}\nA:" for e in FIT]
TARGETS = [e.target for e in FIT]
CFG = {"name": "lorahub", "n": 20, "semantics": "official", "budget": 40, "bound": 1.5, "l1": 0.05,
       "optimizer": "NGOpt", "population": 1, "loss_reduction": "official", "batch_size": None, "max_len": 512}


@pytest.fixture(scope="module")
def pool(tiny_lm):
    from bench.lora.pool import ExpertPool
    from tests.conftest import random_adapter

    return ExpertPool(tiny_lm.model_id, [random_adapter(tiny_lm.model, f"e{i}", tiny_lm.model_id, rank=4,
                                                        alpha=32.0, seed=70 + i) for i in range(5)])


def ctx_for(lm, pool, seed=0):
    return FitContext(model=lm, pool=pool, fit_examples=FIT, seed=seed, prompt=lambda e: f"Q: {e.input}\nA:",
                      score=lambda composed, examples: 0.0)


def onehot(n, k):
    w = np.zeros(n)
    w[k] = 1.0
    return w


def test_one_hot_composition_is_that_expert(pool):
    for k in (0, 3):
        official = compose_official(pool, onehot(len(pool), k))
        exact = compose_exact(pool, onehot(len(pool), k))
        for name, m in pool[k].modules.items():
            torch.testing.assert_close(official.modules[name].A, m.A)
            torch.testing.assert_close(official.modules[name].B, m.B)
            assert official.modules[name].scale == m.scale
            torch.testing.assert_close(exact.modules[name].delta(torch.float64), m.delta(torch.float64))


def test_official_composition_has_cross_terms(pool):
    w = [0.5, -1.0, 0.0, 0.25, 1.2]
    official, exact = compose_official(pool, w), compose_exact(pool, w)
    name = pool.module_names[0]
    A = sum(wi * a.modules[name].A.double() for wi, a in zip(w, pool))
    B = sum(wi * a.modules[name].B.double() for wi, a in zip(w, pool))
    torch.testing.assert_close(official.modules[name].delta(torch.float64), pool[0].modules[name].scale * B @ A,
                               rtol=1e-5, atol=1e-5)  # factors stored in float32
    linear = sum(wi * a.modules[name].delta(torch.float64) for wi, a in zip(w, pool))
    torch.testing.assert_close(exact.modules[name].delta(torch.float64), linear, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(official.modules[name].delta(torch.float64), linear)


@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_in_place_candidates_equal_each_expert_applied_with_peft(tiny_lm, pool, semantics):
    n = len(pool)
    expected = []
    for k in (1, 4):
        with tiny_lm.adapter_applied(pool[k]):
            expected.append(tiny_lm.loss(INPUTS, TARGETS).item())
    base = tiny_lm.loss(INPUTS, TARGETS).item()
    # compared with LanguageModel.loss, the per-example mean: the non-official `mean` reduction
    with LoraHubProblem(tiny_lm, pool, INPUTS, TARGETS, semantics=semantics, max_groups=3,
                        loss_reduction="mean") as problem:
        one = [problem.losses(onehot(n, k))[0] for k in (1, 4)]
        batched = problem.losses(np.stack([onehot(n, 1), np.zeros(n), onehot(n, 4)]))  # population batching
        zero = problem.objective(np.zeros(n))[0]
        reg = problem.objective(onehot(n, 1))[0] - problem.losses(onehot(n, 1))[0]
    np.testing.assert_allclose(one, expected, rtol=1e-5)
    np.testing.assert_allclose(batched, [expected[0], base, expected[1]], rtol=1e-5)
    assert zero == pytest.approx(base, rel=1e-6)
    assert reg == pytest.approx(0.05 / n)  # l1 · mean|w| (the official code's sum/len)
    assert not any(type(m).__name__ in ("StackedLoraLinear", "FactorLoraLinear") for m in tiny_lm.model.modules())


def test_factor_layers_logits_equal_peft(tiny_lm, pool):
    ids, mask = encode_prompts(tiny_lm, INPUTS[:1])
    w = [0.3, -0.7, 0.0, 1.1, 0.4]
    with tiny_lm.adapter_applied(compose_official(pool, w)):
        with torch.no_grad():
            expected = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
    with factor_layers(tiny_lm.model, pool) as bank:
        bank.set_weights(w)
        with torch.no_grad():
            got = tiny_lm.model(input_ids=ids, attention_mask=mask).logits
        adapter = bank.adapter(name="x", base_model=tiny_lm.model_id)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    ref = compose_official(pool, w)
    for name, m in adapter.modules.items():
        torch.testing.assert_close(m.delta(), ref.modules[name].delta(), rtol=1e-5, atol=1e-6)


def test_default_objective_is_the_official_one(tiny_lm, pool):
    """sail-sg/lorahub `default_get_loss` (one batch: the batch's token-mean cross-entropy, divided by the number
    of examples) + `default_l1_regularization` (0.05 · sum|w| / len(w)), written out here, at a non-zero w; the
    method's YAML and `LoraHubProblem` both default to it, and `mean` is K× the official loss."""
    from pathlib import Path

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / "lorahub.yaml")
    assert yaml.loss_reduction == "official" and yaml.batch_size is None  # one batch of all K, as official
    n = len(pool)
    w = np.linspace(-0.8, 0.6, n)
    with LoraHubProblem(tiny_lm, pool, INPUTS, TARGETS) as problem:
        objective = problem.objective(w)[0]
    with LoraHubProblem(tiny_lm, pool, INPUTS, TARGETS, loss_reduction="mean") as problem:
        mean_loss = problem.losses(w)[0]
    batch = tiny_lm.encode_pairs(INPUTS, TARGETS)
    with tiny_lm.adapter_applied(compose_official(pool, w)), torch.no_grad():
        logits = tiny_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   ignore_index=-100).item()
    official = token_mean / len(INPUTS) + 0.05 * sum(abs(x) for x in w) / len(w)
    assert objective == pytest.approx(official, rel=1e-5)
    per_example = [torch.nn.functional.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100)
                   for i in range(len(INPUTS))]
    assert mean_loss == pytest.approx(float(sum(per_example)) / len(INPUTS), rel=1e-5)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_objective_batches_are_independent_of_the_forward_batches(tiny_lm, pool, batch_size):
    """The official loss over batches of `batch_size` examples in input order (None: all K), written out per
    batch; the forwards are token-budget batches (here a budget small enough for one or two examples each)."""
    w = np.linspace(0.5, -0.7, len(pool))
    lengths = [len(r) for r in tiny_lm._pair_rows(INPUTS, TARGETS, 512)[0]]
    with LoraHubProblem(tiny_lm, pool, INPUTS, TARGETS, batch_size=batch_size,
                        token_budget=2 * max(lengths)) as problem:
        assert len(problem.forwards) >= 3
        loss = problem.losses(w)[0]
    size = batch_size or len(INPUTS)
    expected = 0.0
    with tiny_lm.adapter_applied(compose_official(pool, w)), torch.no_grad():
        for i in range(0, len(INPUTS), size):
            batch = tiny_lm.encode_pairs(INPUTS[i : i + size], TARGETS[i : i + size])
            logits = tiny_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            expected += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                          ignore_index=-100).item()
    assert loss == pytest.approx(expected / len(INPUTS), rel=1e-5)


def test_search_improves_the_objective_and_is_reproducible(tiny_lm, pool):
    kw = dict(budget=40, seed=3)
    first = lorahub_search(tiny_lm, pool, INPUTS, TARGETS, **kw)
    again = lorahub_search(tiny_lm, pool, INPUTS, TARGETS, **kw)
    assert first.evaluations == 40 and len(first.history) == 40
    assert first.objective < first.objective_at_zero
    assert first.weights == again.weights and first.history == again.history
    assert all(-1.5 <= w <= 1.5 for w in first.weights)
    # with one worker NGOpt picks COBYLA here (deterministic from w = 0), so the seed cannot matter


def test_search_exact_with_population_batching(tiny_lm, pool):
    kw = dict(semantics="exact", budget=24, population=4)
    result = lorahub_search(tiny_lm, pool, INPUTS, TARGETS, seed=0, **kw)
    assert result.evaluations == 24 and result.objective < result.objective_at_zero
    assert lorahub_search(tiny_lm, pool, INPUTS, TARGETS, seed=0, **kw).weights == result.weights
    # with 4 workers NGOpt's choice samples candidates from the seeded random state
    assert lorahub_search(tiny_lm, pool, INPUTS, TARGETS, seed=1, **kw).weights != result.weights


def test_method_compose_end_to_end(tiny_lm, pool, tmp_path):
    method = LoraHub(OmegaConf.create({**CFG, "semantics": ["official", "exact"], "budget": 12, "n": 3}))
    before = tiny_lm.generate(INPUTS[:2], max_new_tokens=4)
    gen = method.compose(ctx_for(tiny_lm, pool, seed=1))
    variants = []
    for composed in gen:
        report = composed.report
        assert report.examples == 5 and report.steps == 12 and report.trained_params == 3 and report.seconds > 0
        weights = report.info["weights"]
        assert list(weights) == pool.sample(3, 1).names
        assert composed.adapter.metadata["weights"] == weights
        assert len(composed.generate(INPUTS[:2], max_new_tokens=4)) == 2
        folder = composed.save(tmp_path / (composed.variant or "official"))
        loaded = LoraAdapter.from_peft_folder(folder)
        assert set(loaded.modules) == set(composed.adapter.modules)
        variants.append(composed.variant)
    assert variants == ["", "exact"]
    assert tiny_lm.generate(INPUTS[:2], max_new_tokens=4) == before  # the base is restored


def test_unequal_ranks(tiny_lm, make_pool):
    mixed = make_pool(3, ranks=[2, 4, 4])
    with pytest.raises(AdapterError, match="semantics=exact"):
        compose_official(mixed, [1, 0, 0])
    with pytest.raises(AdapterError, match="rank"):
        LoraHubProblem(tiny_lm, mixed, INPUTS, TARGETS, semantics="official")
    result = lorahub_search(tiny_lm, mixed, INPUTS, TARGETS, semantics="exact", budget=4)
    assert len(result.weights) == 3


def test_bad_configs():
    for bad in ({"semantics": "sqrt"}, {"budget": 0}, {"bound": 0}, {"loss_reduction": "sum"}, {"n": 0}):
        with pytest.raises(ConfigError):
            LoraHub(OmegaConf.create({**CFG, **bad}))


def test_seq2seq_candidates_equal_each_expert(tiny_t5):
    """LoraHub's own setting is a seq2seq model (flan-t5): encoder and decoder LoRAs, labels through the decoder."""
    from bench.lora.pool import ExpertPool
    from tests.conftest import random_adapter

    t5_pool = ExpertPool(tiny_t5.model_id, [random_adapter(tiny_t5.model, f"t{i}", tiny_t5.model_id, targets=("q", "v"),
                                                           alpha=16.0, seed=i) for i in range(3)])
    inputs, targets = ["True and False is", "(1 + 2) ="], ["False", "3"]
    expected = []
    for k in (1, 2):
        with tiny_t5.adapter_applied(t5_pool[k]):
            expected.append(tiny_t5.loss(inputs, targets).item())
    for semantics in ("official", "exact"):
        with LoraHubProblem(tiny_t5, t5_pool, inputs, targets, semantics=semantics, max_groups=2,
                            loss_reduction="mean") as problem:
            got = problem.losses(np.stack([onehot(3, 1), onehot(3, 2)]))
        np.testing.assert_allclose(got, expected, rtol=1e-4)
