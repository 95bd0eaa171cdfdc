"""Decoding-time LoRA Switch / LoRA Composite for text (methods/ops/text_decoding.py)."""

import pytest
import torch
from omegaconf import OmegaConf

from bench.lora.stacked import set_gates
from methods.base import FitContext
from methods.ops.text_decoding import (
    CompositeHooks,
    SwitchHooks,
    text_composite_compose,
    text_switch_compose,
    text_switch_schedule,
)
from tests.conftest import encode_prompts

PROMPTS = ["The capital of France is", "( True and not False ) is", "Sort the words: zebra apple mango"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def pool3(tiny_lm):
    from bench.lora.pool import ExpertPool
    from tests.conftest import random_adapter

    # strong experts (alpha 64) so that each one changes the greedy continuation
    adapters = [random_adapter(tiny_lm.model, f"e{i}", tiny_lm.model_id, rank=4, alpha=64.0, seed=100 + i)
                for i in range(3)]
    return ExpertPool(tiny_lm.model_id, adapters)


def ctx_for(lm, pool):
    return FitContext(model=lm, pool=pool, fit_examples=[], seed=0, prompt=lambda e: e.input,
                      score=lambda composed, examples: 0.0)


def alone(lm, adapter, prompts=PROMPTS):
    with lm.adapter_applied(adapter):
        return lm.generate(prompts, max_new_tokens=MAX_NEW, batch_size=len(prompts))


@torch.no_grad()
def reference_loop(lm, layers, prompts, n, pick):
    """Serial greedy reference with explicit KV caches, one per expert: at step t, `pick(t, logps)` returns
    (token, experts to run next); causal LMs only."""
    ids, mask = encode_prompts(lm, prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eye = torch.eye(n)
    pasts, logps = {}, {}
    for e in range(n):
        set_gates(layers, eye[e])
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        pasts[e], logps[e] = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), -1)
    tokens = []
    for t in range(MAX_NEW):
        nxt = pick(t, logps)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        for e in range(n):
            set_gates(layers, eye[e])
            out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                           past_key_values=pasts[e], use_cache=True)
            pasts[e], logps[e] = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), -1)
    return decode(lm, torch.stack(tokens, 1))


def decode(lm, new):
    eos = lm.tokenizer.eos_token_id
    rows = []
    for row in new.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return lm.tokenizer.batch_decode(rows, skip_special_tokens=True)


def test_switch_schedule():
    from methods.lora_switch import switch_schedule  # the diffusion form: an import failure fails the test

    assert text_switch_schedule(12, 3, 2) == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert text_switch_schedule(5, 2, 5) == [0] * 5
    assert text_switch_schedule(4, 1, 1) == [0, 0, 0, 0]
    assert list(switch_schedule(12, 3, 2)) == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    assert list(switch_schedule(7, 2, 3)) == [0, 0, 0, 1, 1, 1, 0]


def test_composite_single_expert_equals_that_expert(tiny_lm, pool3):
    pool = pool3.subset(["e1"])
    gen = text_composite_compose(ctx_for(tiny_lm, pool), OmegaConf.create({}))
    composed = next(gen)
    assert isinstance(composed.hooks, CompositeHooks)
    got = composed.generate(PROMPTS, max_new_tokens=MAX_NEW, batch_size=2)
    gen.close()
    assert got == alone(tiny_lm, pool3[1])
    assert not any(type(m).__name__ == "StackedLoraLinear" for m in tiny_lm.model.modules())  # restored


def test_composite_batched_equals_serial_average(tiny_lm, pool3):
    gen = text_composite_compose(ctx_for(tiny_lm, pool3), OmegaConf.create({}))
    composed = next(gen)
    got = composed.generate(PROMPTS, max_new_tokens=MAX_NEW, batch_size=8)
    layers = composed.hooks.layers
    ref = reference_loop(tiny_lm, layers, PROMPTS, 3,
                         lambda t, logps: torch.stack([logps[e] for e in range(3)]).mean(0).argmax(-1))
    gen.close()
    assert got == ref
    # composing matters: the average is not simply one of the experts here
    assert got != alone(tiny_lm, pool3[0]) or got != alone(tiny_lm, pool3[1])


def test_switch_long_tau_equals_first_expert(tiny_lm, pool3):
    gen = text_switch_compose(ctx_for(tiny_lm, pool3), OmegaConf.create({"tau": MAX_NEW}))
    composed = next(gen)
    assert isinstance(composed.hooks, SwitchHooks)
    got = composed.generate(PROMPTS, max_new_tokens=MAX_NEW, batch_size=8)
    gen.close()
    assert got == alone(tiny_lm, pool3[0])


@pytest.mark.parametrize("tau", [1, 2])
def test_switch_uses_the_intended_expert_at_each_token(tiny_lm, pool3, tau):
    gen = text_switch_compose(ctx_for(tiny_lm, pool3), OmegaConf.create({"tau": tau}))
    composed = next(gen)
    got = composed.generate(PROMPTS, max_new_tokens=MAX_NEW, batch_size=8)
    # written out by hand: token t comes from expert (t // tau) mod 3
    intended = {1: [0, 1, 2, 0, 1, 2, 0, 1], 2: [0, 0, 1, 1, 2, 2, 0, 0]}[tau]
    trace = composed.hooks.trace  # the expert behind each forward of the (one) batch
    assert len(trace) >= 2
    assert trace == intended[: len(trace)]
    # a serial reference that runs every expert on its own cache would differ (the switch shares one
    # cache); so the reference uses one shared cache, switching the gates between steps.
    ids, mask = encode_prompts(tiny_lm, PROMPTS)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eye = torch.eye(3)
    tokens = []
    with torch.no_grad():
        set_gates(composed.hooks.layers, eye[0])
        out = tiny_lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for t in range(MAX_NEW):
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            set_gates(composed.hooks.layers, eye[(t + 1) // tau % 3])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            out = tiny_lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                past_key_values=out.past_key_values, use_cache=True)
    gen.close()
    assert got == decode(tiny_lm, torch.stack(tokens, 1))
    assert got != alone(tiny_lm, pool3[0])  # switching changed the continuation


def test_switch_subset_and_bad_tau(tiny_lm, pool3):
    from bench.errors import ConfigError

    gen = text_switch_compose(ctx_for(tiny_lm, pool3), OmegaConf.create({"tau": 3, "experts": ["e2"]}))
    composed = next(gen)
    assert composed.hooks.n == 1 and composed.report.info["experts"] == ["e2"]
    got = composed.generate(PROMPTS[:1], max_new_tokens=MAX_NEW)
    gen.close()
    assert got == alone(tiny_lm, pool3[2], PROMPTS[:1])
    with pytest.raises(ConfigError):
        next(text_switch_compose(ctx_for(tiny_lm, pool3), OmegaConf.create({"tau": 0})))


def test_seq2seq_forms(tiny_t5):
    from bench.lora.pool import ExpertPool
    from tests.conftest import random_adapter

    pool = ExpertPool(tiny_t5.model_id, [random_adapter(tiny_t5.model, f"t{i}", tiny_t5.model_id, targets=("q", "v"),
                                                        alpha=64.0, seed=i) for i in range(2)])
    prompts = ["True and False is", "(1 + 2) ="]
    gen = text_composite_compose(ctx_for(tiny_t5, pool), OmegaConf.create({"experts": ["t1"]}))
    got = next(gen).generate(prompts, max_new_tokens=MAX_NEW)
    gen.close()
    gen = text_switch_compose(ctx_for(tiny_t5, pool), OmegaConf.create({"tau": MAX_NEW}))
    switched = next(gen).generate(prompts, max_new_tokens=MAX_NEW)
    gen.close()
    assert got == alone(tiny_t5, pool[1], prompts)
    assert switched == alone(tiny_t5, pool[0], prompts)


# --------------------------------------------------------------------------- lora_scale, against folded weights


def folded_copies(lm, pool, scale: float) -> list[torch.nn.Module]:
    """One copy of the model per expert with ``W += scale · s B A`` folded in (no stacked layer involved)."""
    import copy

    copies = []
    for adapter in pool:
        model = copy.deepcopy(lm.model)
        with torch.no_grad():
            for path, m in adapter.modules.items():
                weight = model.get_submodule(path).weight
                weight += (scale * m.scale * m.B.double() @ m.A.double()).to(weight.dtype)
        copies.append(model)
    return copies


@torch.no_grad()
def folded_reference(lm, models, prompts, choose):
    """Greedy decoding where `choose(t)` names, for generated token t, either one expert (its model, the Switch:
    one cache shared by all) or None (every expert on its own cache, log-probabilities averaged: Composite)."""
    ids, mask = encode_prompts(lm, prompts)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    shared = choose(0) is not None
    if shared:
        out = models[choose(0)](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        pasts = {"shared": out.past_key_values}
        logits = out.logits[:, -1]
    else:
        outs = [m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True) for m in models]
        pasts = {e: o.past_key_values for e, o in enumerate(outs)}
        logits = torch.stack([torch.log_softmax(o.logits[:, -1].float(), -1) for o in outs]).mean(0)
    tokens = []
    for t in range(MAX_NEW):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        step = dict(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True)
        if shared:
            out = models[choose(t + 1)](past_key_values=pasts["shared"], **step)
            pasts["shared"], logits = out.past_key_values, out.logits[:, -1]
        else:
            outs = [m(past_key_values=pasts[e], **step) for e, m in enumerate(models)]
            pasts = {e: o.past_key_values for e, o in enumerate(outs)}
            logits = torch.stack([torch.log_softmax(o.logits[:, -1].float(), -1) for o in outs]).mean(0)
    return decode(lm, torch.stack(tokens, 1))


@pytest.mark.parametrize("form", ["switch", "composite"])
def test_lora_scale_scales_every_expert(tiny_lm, pool3, form):
    """Three experts at lora_scale 0.3 equal a decoding loop over models with ``0.3 · s B A`` folded in, and differ
    from the same method at scale 1 (so the scale is applied, not ignored)."""
    scale, tau = 0.3, 2
    compose = text_switch_compose if form == "switch" else text_composite_compose
    choose = (lambda t: (t // tau) % 3) if form == "switch" else (lambda t: None)

    def run(s):
        gen = compose(ctx_for(tiny_lm, pool3), OmegaConf.create({"tau": tau, "lora_scale": s}))
        composed = next(gen)
        got = composed.generate(PROMPTS, max_new_tokens=MAX_NEW, batch_size=8)
        assert composed.report.info["lora_scale"] == s
        gen.close()
        return got

    got, at_one = run(scale), run(1.0)
    assert got == folded_reference(tiny_lm, folded_copies(tiny_lm, pool3, scale), PROMPTS, choose)
    assert at_one == folded_reference(tiny_lm, folded_copies(tiny_lm, pool3, 1.0), PROMPTS, choose)
    assert got != at_one
