"""Retrieval router: the real all-MiniLM-L6-v2 offline, top-k retrieval, per-row composition."""

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import AdapterError, ConfigError
from bench.lora.pool import ExpertPool
from methods.base import FitContext
from methods.linear import concat_merge
from methods.lorahub import compose_official
from methods.retriever import Retriever, expert_embeddings, load_embedder, retrieval_weights
from tasks.algorithmic import generate
from tests.conftest import encode_prompts, random_adapter

FAMILIES = ["boolean_expressions", "multistep_arithmetic", "word_sorting", "object_counting"]
PROMPT = "Q: {input}\nA:"
CFG = {"name": "retriever", "k": 2, "combine": "outputs", "weighting": "uniform", "temperature": 1.0,
       "expert_embedding": "auto", "examples_per_expert": 8, "embedder_path": None, "n": None}


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(None, "cpu")


@pytest.fixture(scope="module")
def task_pool(tiny_lm):
    adapters = []
    for i, family in enumerate(FAMILIES):
        a = random_adapter(tiny_lm.model, f"expert_{family}", tiny_lm.model_id, rank=4, alpha=64.0, seed=40 + i)
        a.metadata = {"task": "algorithmic", "subtask": family}
        adapters.append(a)
    return ExpertPool(tiny_lm.model_id, adapters)


def ctx_for(lm, pool):
    return FitContext(model=lm, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input,
                      score=lambda composed, examples: 0.0)


def test_minilm_embeddings(embedder):
    e = embedder.encode(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                         "Stock markets fell sharply today."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]
    assert embedder.encode([]).shape == (0, 384)


def test_retrieval_weights():
    keys = torch.eye(3)
    q = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    w = retrieval_weights(q, keys, 2)
    assert w.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
    ws = retrieval_weights(q, keys, 2, "softmax", 0.1)
    assert torch.allclose(ws.sum(-1), torch.ones(2)) and ws[0, 0] > ws[0, 1] and ws[0, 2] == 0
    assert retrieval_weights(q, keys, 5).count_nonzero() == 6  # k capped at N


def test_experts_are_retrieved_by_task(embedder, task_pool):
    keys, source, n = expert_embeddings(embedder, task_pool, "auto", 8, seed=0)
    assert source == "examples" and n == 32 and keys.shape == (4, 384)
    queries = [PROMPT.format(input=generate(f, "query", i).input) for f in FAMILIES for i in range(4)]
    top1 = retrieval_weights(embedder.encode(queries), keys, 1).argmax(-1)
    assert top1.tolist() == [i for i in range(4) for _ in range(4)]


def test_descriptions_as_expert_embeddings(embedder, task_pool):
    described = ExpertPool(task_pool.base_model, [a.to(torch.float32) for a in task_pool])
    for a, text in zip(described, ["evaluating boolean logic", "arithmetic with integers",
                                   "sorting words alphabetically", "counting objects"]):
        a.metadata = {**a.metadata, "description": text}
    keys, source, n = expert_embeddings(embedder, described, "auto")
    assert source == "description" and n == 4
    with pytest.raises(ConfigError, match="description"):
        expert_embeddings(embedder, task_pool, "description")


@pytest.mark.parametrize("combine", ["outputs", "weights"])
def test_each_row_gets_its_own_composition(tiny_lm, task_pool, combine):
    method = Retriever(OmegaConf.create({**CFG, "combine": combine}))
    gen = method.compose(ctx_for(tiny_lm, task_pool))
    composed = next(gen)
    assert composed.variant == ("" if combine == "outputs" else "weights")
    rows = [generate(f, "mixed", 7) for f in ["object_counting", "word_sorting", "boolean_expressions"]]
    prompts = [PROMPT.format(input=e.input) for e in rows]
    got = composed.generate(prompts, max_new_tokens=6, batch_size=3)
    weights, sims = composed.route(prompts)
    # the row's own task is the most similar expert, listed first
    assert [r[0] for r in composed.routes] == [f"expert_{e.subtask}" for e in rows]
    assert composed.report.info["route_counts"] == {f"expert_{e.subtask}": 1 for e in rows}
    assert all(len(r) == 2 for r in composed.routes)
    assert len({tuple(r) for r in composed.routes}) > 1  # rows got different compositions
    composed.apply(weights)
    ids, mask = encode_prompts(tiny_lm, prompts)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batched = tiny_lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    composed.apply(None)
    gen.close()
    expected = []
    for j in range(len(rows)):
        w = weights[j].tolist()
        adapter = concat_merge(list(task_pool), w) if combine == "outputs" else compose_official(task_pool, w)
        with tiny_lm.adapter_applied(adapter):
            expected += tiny_lm.generate([prompts[j]], max_new_tokens=6, batch_size=1)
            one_ids, one_mask = encode_prompts(tiny_lm, [prompts[j]])
            with torch.no_grad():
                alone = tiny_lm.model(input_ids=one_ids, attention_mask=one_mask).logits[0]
        torch.testing.assert_close(batched[j][mask[j].bool()], alone, rtol=1e-4, atol=1e-4)
    assert got == expected
    assert not any(type(m).__name__ in ("StackedLoraLinear", "FactorLoraLinear") for m in tiny_lm.model.modules())


def test_bad_configs(tiny_lm, make_pool):
    for bad in ({"k": 0}, {"combine": "sum"}, {"weighting": "max"}, {"temperature": 0}):
        with pytest.raises(ConfigError):
            Retriever(OmegaConf.create({**CFG, **bad}))
    mixed = make_pool(2, ranks=[2, 4])
    with pytest.raises(AdapterError, match="rank"):
        next(Retriever(OmegaConf.create({**CFG, "combine": "weights"})).compose(ctx_for(tiny_lm, mixed)))
