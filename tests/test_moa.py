"""MoA: the router learns the experts' tasks; a mixed batch routes each row to its own expert."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from methods import moa
from methods.base import FitContext
from methods.moa import (
    MixtureOfLoras,
    holdout_split,
    route_gates,
)
from tasks.algorithmic import generate
from tests.conftest import encode_prompts, random_adapter

FAMILIES = ["boolean_expressions", "multistep_arithmetic", "word_sorting", "object_counting"]
CFG = {"name": "moa", "examples_per_expert": 24, "holdout": 0.25, "top_k": 1, "hidden": 0, "epochs": 200,
       "lr": 0.01, "weight_decay": 0.01, "feature_batch_size": 32, "n": None}


PROMPT = "Q: {input}\nA:"  # conf/task/algorithmic.yaml's prompt_template


@pytest.fixture(scope="module")
def task_pool(tiny_lm):
    adapters = []
    for i, family in enumerate(FAMILIES):
        a = random_adapter(tiny_lm.model, f"expert_{family}", tiny_lm.model_id, rank=4, alpha=64.0, seed=10 + i)
        a.metadata = {"task": "algorithmic", "subtask": family}  # as bench.experts.pools writes it
        adapters.append(a)
    return ExpertPool(tiny_lm.model_id, adapters)


def ctx_for(lm, pool, seed=0):
    return FitContext(model=lm, pool=pool, fit_examples=[], seed=seed, prompt=lambda e: e.input,
                      score=lambda composed, examples: 0.0)


def test_route_gates_and_split():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.0]])
    assert route_gates(logits, 1).tolist() == [[0, 1, 0], [1, 0, 0]]
    g2 = route_gates(logits, 2)
    assert torch.allclose(g2.sum(-1), torch.ones(2)) and (g2 > 0).sum().item() == 4 and g2[0, 2] == 0
    train, held = holdout_split([0] * 8 + [1] * 4, 0.25, seed=0)
    assert sorted(train + held) == list(range(12)) and len(held) == 3
    assert holdout_split([0] * 8 + [1] * 4, 0.25, 0) == (train, held)


def test_expert_prompts_come_from_the_experts_tasks(task_pool):
    prompts = moa.expert_prompts(task_pool[2], 3, seed=0)
    assert len(prompts) == 3 and all(p.startswith("Q: Sort the following words") and p.endswith("A:") for p in prompts)
    assert moa.expert_prompts(task_pool[2], 3, seed=0) == prompts


def test_an_expert_whose_task_cannot_be_built_is_an_error_not_raw_inputs(task_pool, monkeypatch):
    """The router must learn from the prompts the experts read: a task config that cannot be loaded (renamed,
    missing) stops the method with that error instead of quietly routing on raw inputs."""
    real = moa.expert_examples
    monkeypatch.setattr(moa, "expert_examples", lambda adapter, n, seed: real(task_pool[2], n, seed))
    adapter = copy.copy(task_pool[2])
    adapter.metadata = {**task_pool[2].metadata, "task": "no_such_task"}
    with pytest.raises(ConfigError, match="no task config 'no_such_task'"):
        moa.expert_prompts(adapter, 3, seed=0)


def test_missing_provider_is_a_clear_error(task_pool, monkeypatch):
    import bench.experts.pools

    monkeypatch.delattr(bench.experts.pools, "expert_task_examples")
    with pytest.raises(ConfigError, match="expert_task_examples"):
        moa.expert_examples(task_pool[0], 4, 0)


def test_router_accuracy_on_the_pools_own_tasks(tiny_lm, task_pool):
    method = MixtureOfLoras(OmegaConf.create(CFG))
    router, info = method.fit_router(tiny_lm, task_pool, seed=0)
    assert info["heldout_examples"] == 4 * 6 and info["router_examples"] == 4 * 18
    assert info["routing_accuracy"] >= 0.9, info
    # fresh examples (another seed) are routed to their task's expert
    feats = moa.hidden_features(tiny_lm, [PROMPT.format(input=generate(f, "fresh", i).input)
                                          for f in FAMILIES for i in range(5)])
    pred = router(feats).argmax(-1)
    truth = torch.arange(4).repeat_interleave(5)
    assert (pred == truth).float().mean() >= 0.9


def test_mixed_batch_routes_each_row_to_its_own_expert(tiny_lm, task_pool):
    method = MixtureOfLoras(OmegaConf.create(CFG))
    gen = method.compose(ctx_for(tiny_lm, task_pool))
    composed = next(gen)
    assert composed.report.info["routing_accuracy"] >= 0.9
    # one row of each task, different lengths (left padding), in a mixed order
    rows = [generate(f, "mixed", 3) for f in ["word_sorting", "boolean_expressions", "object_counting",
                                              "multistep_arithmetic"]]
    prompts = [PROMPT.format(input=e.input) for e in rows]
    got = composed.generate(prompts, max_new_tokens=6, batch_size=4)
    assert [r[0] for r in composed.routes] == [f"expert_{e.subtask}" for e in rows]
    assert composed.report.info["route_counts"] == {f"expert_{e.subtask}": 1 for e in rows}
    # the same gates on a padded forward give each row the logits of its expert alone
    gates, _ = composed.route(prompts)
    composed.apply(gates)
    ids, mask = moa_inputs(tiny_lm, prompts)
    with torch.no_grad():
        batched = tiny_lm.model(input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    composed.apply(None)
    gen.close()
    expected_texts = []
    for j, e in enumerate(rows):
        expert = task_pool.subset([f"expert_{e.subtask}"])[0]
        with tiny_lm.adapter_applied(expert):
            expected_texts += tiny_lm.generate([prompts[j]], max_new_tokens=6, batch_size=1)
            one_ids, one_mask = moa_inputs(tiny_lm, [prompts[j]])
            with torch.no_grad():
                alone = tiny_lm.model(input_ids=one_ids, attention_mask=one_mask).logits[0]
        valid = mask[j].bool()
        torch.testing.assert_close(batched[j][valid], alone, rtol=1e-4, atol=1e-4)
    assert got == expected_texts
    assert len(set(expected_texts)) > 1  # the experts really differ on these rows
    assert not any(type(m).__name__ == "StackedLoraLinear" for m in tiny_lm.model.modules())


def moa_inputs(lm, prompts):

    return encode_prompts(lm, prompts)


def test_top_k_weighted_routing_is_a_variant(tiny_lm, task_pool, tmp_path):
    method = MixtureOfLoras(OmegaConf.create({**CFG, "top_k": 2}))
    gen = method.compose(ctx_for(tiny_lm, task_pool))
    composed = next(gen)
    assert composed.variant == "top2"
    gates, _ = composed.route([PROMPT.format(input="( True and False ) is"),
                            PROMPT.format(input="I have two cats. How many animals do I have?")])
    assert torch.allclose(gates.sum(-1), torch.ones(2)) and ((gates > 0).sum(-1) == 2).all()
    out = composed.generate(["( True and False ) is"], max_new_tokens=3)
    folder = composed.save(tmp_path / "moa")
    gen.close()
    assert len(out) == 1 and len(composed.routes[0]) == 2
    state = torch.load(folder / "routing.pt", weights_only=True)
    assert state["experts"] == task_pool.names and state["top_k"] == 2 and "net.weight" in state["router"]
    # a second fit unit with the same experts and seed reuses the router (trained once per run)
    gen2 = method.compose(ctx_for(tiny_lm, task_pool))
    again = next(gen2)
    gen2.close()
    assert again.report.info["router_reused"] and again.report.examples == 0


def test_bad_config():
    with pytest.raises(ConfigError):
        MixtureOfLoras(OmegaConf.create({**CFG, "top_k": 0}))


def test_an_experts_features_are_computed_once_per_seed(tiny_lm, task_pool, monkeypatch):
    """Routers over different draws of one pool (the cross-task folds) reuse each expert's features; the reused
    features equal freshly computed ones, and the router is the one a fresh method would train."""
    import methods.moa as moa
    from bench.registry import get_method
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "moa", "examples_per_expert": 6, "holdout": 0.25, "epochs": 20, "lr": 0.01})
    calls = []
    real = moa.hidden_features
    monkeypatch.setattr(moa, "hidden_features", lambda lm, prompts, *a, **k: calls.append(len(prompts)) or real(lm, prompts, *a, **k))
    method = get_method("moa")(cfg)
    first = task_pool.subset(task_pool.names[:2])
    second = task_pool.subset(task_pool.names[1:])
    method.fit_router(tiny_lm, first, seed=0)
    router, _ = method.fit_router(tiny_lm, second, seed=0)
    assert calls == [12, 6 * (len(task_pool) - 2)]  # the shared expert's prompts are not read again
    fresh, _ = get_method("moa")(cfg).fit_router(tiny_lm, second, seed=0)
    for a, b in zip(router.state_dict().values(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    method.fit_router(tiny_lm, first, seed=1)
    assert calls[-1] == 12  # another seed draws other examples


def test_features_are_the_mean_pooled_last_hidden_state(tiny_lm):
    """MoA's input representation: the mean over the prompt's tokens of the LM's final hidden state (after the
    last norm), the same state the full model reports as its last `hidden_states` entry."""
    prompts = [PROMPT.format(input=generate(f, "pool", 1).input) for f in FAMILIES]
    feats = moa.hidden_features(tiny_lm, prompts)
    for prompt, row in zip(prompts, feats):
        ids = torch.tensor([tiny_lm.prompt_ids(prompt)])
        with torch.no_grad():
            states = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(row, states[-1][0].float().mean(0), rtol=1e-5, atol=1e-5)
