"""LoRA-Flow (methods/lora_flow.py): per-block per-token gates from the block input, gate-only training, saving.

About "zero gate weights and zero bias give the base model": by LoRA-Flow's definition w = softmax(W x) + b,
so W = 0 and b = 0 give w = 1/N (the uniform merge), not 0. We test both facts: fused weights forced to 0
give the base model exactly; W = 0, b = 0 give the uniform linear merge (`methods.linear.concat_merge`, 1/N).
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.errors import ConfigError
from methods.base import FitContext
from methods.linear import concat_merge
from methods.lora_flow import LoraFlow, attach_saved_gates, lora_flow_attached
from methods.ops.gates import load_gates
from tasks.algorithmic import generate

PROMPTS = ["not True and False is", "( True or False ) and not False is"]


def fit_examples(n=6):
    return [generate("boolean_expressions", "fit", i) for i in range(n)]


def context(lm, pool, examples=None, seed=0):
    return FitContext(lm, pool, examples or fit_examples(), seed, lambda e: e.input, score=None)


def encode(lm, prompts=PROMPTS):
    return lm.tokenizer(prompts, return_tensors="pt", padding=True)


def logits(lm, prompts=PROMPTS):
    with torch.no_grad():
        return lm.model(**encode(lm, prompts)).logits


def flow_cfg(**over):
    base = dict(lr=0.05, epochs=3, batch_size=2, temperature=1.0, bias_init=None, weight_decay=0.1,
                betas=[0.9, 0.95], eps=1e-5, clip_grad=1.0, schedule="cosine", warmup_ratio=0.2)
    return OmegaConf.create({**base, **over})


def randomize(router, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in router.gates.values():
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g) * 0.3)


def test_gate_shapes_per_block_and_token(tiny_lm, make_pool):
    pool = make_pool(4)
    enc = encode(tiny_lm)
    batch, seq = enc["input_ids"].shape
    with lora_flow_attached(tiny_lm, pool) as router:
        assert set(router.blocks.values()) == {"model.layers.0", "model.layers.1"}
        for gate in router.gates.values():
            assert gate.weight.shape == (4, 64) and gate.bias.shape == (4,)
        randomize(router)
        router.record = True
        with torch.no_grad():
            tiny_lm.model(**enc)
        assert len(router.records) == 2
        for _, w in router.records:
            assert w.shape == (batch, seq, 4)
            assert not torch.allclose(w[0, 0], w[0, 1])  # per token
        # the gate reads the block input: w of block l is softmax(W_l x_l) + b_l with x_l the block's input
        hidden = tiny_lm.model(**enc, output_hidden_states=True).hidden_states
        for (key, w), x in zip(router.records, hidden[:2]):
            gate = router.gates[key]
            torch.testing.assert_close(w, torch.softmax(x @ gate.weight.T, -1) + gate.bias)


def test_gate_and_output_by_hand_with_temperature_batch_and_padding(tiny_lm, make_pool):
    """LoRA-Flow's definition computed here, independently, in float64 (the model too), with T = 2.5 ≠ 1, a non-zero bias, three
    prompts of different lengths (left-padded) and many tokens each: for block l and token t with block input x_t
    (HF's hidden_states[l]), w = softmax(W_l x_t / T) + b_l (thunlp/LoRAFlow `LlamaDecoderLayer.forward`:
    ``softmax(lora_fusion_gate(h) / temperature) + weight_bias``), and every LoRA'd matrix of the block outputs
    ``W x + Σ_i w_i s_i B_i A_i x`` at that token."""
    import copy
    import dataclasses

    T = 2.5
    lm = dataclasses.replace(tiny_lm, model=copy.deepcopy(tiny_lm.model).double())
    pool = make_pool(3, ranks=[2, 4, 3])
    tok = lm.tokenizer
    prompts = ["not True and False is", "( True or False ) and not ( False or True ) is", "True is"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    assert width > 5 and mask.sum(1).unique().numel() == 3
    g = torch.Generator().manual_seed(7)
    with lora_flow_attached(lm, pool, temperature=T) as router:
        W, b = {}, {}  # values a float32 gate holds exactly (FlowGate computes in float32)
        with torch.no_grad():
            for key, gate in router.gates.items():
                W[key] = torch.randn(gate.weight.shape, generator=g).double()
                b[key] = (torch.randn(gate.bias.shape, generator=g) * 0.3).double()
                gate.weight.copy_(W[key])
                gate.bias.copy_(b[key])
        io = {}  # matrix path -> (input, output) of its stacked layer
        handles = [layer.register_forward_hook(lambda m, args, out, p=path: io.__setitem__(p, (args[0], out)))
                   for path, layer in router.layers.items()]
        router.record = True
        try:
            with torch.no_grad():
                hidden = lm.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        finally:
            router.record = False
            for handle in handles:
                handle.remove()
        blocks = {block: key for key, block in router.blocks.items()}
        assert [k for k, _ in router.records] == [blocks["model.layers.0"], blocks["model.layers.1"]]
        expected_w = {}
        for l, block in enumerate(["model.layers.0", "model.layers.1"]):
            key = blocks[block]
            z = hidden[l] @ W[key].T / T  # (batch, tokens, N)
            z = z - z.max(-1, keepdim=True).values
            expected_w[block] = z.exp() / z.exp().sum(-1, keepdim=True) + b[key]
            got = dict(router.records)[key]
            assert got.shape == (3, width, 3)
            # float32 gate arithmetic (`FlowGate` casts its input to float32): ≤ 6e-7 from the float64 reference,
            # while a wrong T, bias placement or input gives differences of order 1e-2 and more
            torch.testing.assert_close(got.double(), expected_w[block], rtol=0, atol=1e-5)
            assert (got.max(-1).values - got.min(-1).values).min() > 1e-2  # not the uniform start
        for path, (x, y) in io.items():  # q_proj and v_proj of both blocks
            block = path.rsplit(".", 2)[0]
            w = expected_w[block]
            expected = x @ router.layers[path].base.weight.T
            for i, adapter in enumerate(pool):
                m = adapter.modules[path]
                expected = expected + w[..., i : i + 1] * (m.scale * (x @ m.A.double().T @ m.B.double().T))
            assert y.dtype == torch.float64
            torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_zero_fused_weights_give_base_model(tiny_lm, make_pool):
    pool = make_pool(3)
    base = logits(tiny_lm)
    with lora_flow_attached(tiny_lm, pool) as router:
        randomize(router)
        assert not torch.allclose(logits(tiny_lm), base, atol=1e-3)
        router.override = torch.zeros_like
        torch.testing.assert_close(logits(tiny_lm), base, rtol=1e-6, atol=1e-6)


def test_zero_gate_and_bias_give_uniform_merge(tiny_lm, make_pool):
    pool = make_pool(3)
    with tiny_lm.adapter_applied(concat_merge(list(pool), [1 / 3] * 3)):
        merged = logits(tiny_lm)
    with lora_flow_attached(tiny_lm, pool) as router:  # fresh gates: W = 0, b = 0
        assert all(torch.all(g.weight == 0) and torch.all(g.bias == 0) for g in router.gates.values())
        torch.testing.assert_close(logits(tiny_lm), merged, rtol=1e-4, atol=1e-4)


def test_official_bias_init_is_expressible(tiny_lm, make_pool):
    pool = make_pool(2)
    with tiny_lm.adapter_applied(pool[1]):
        second = logits(tiny_lm)
    with lora_flow_attached(tiny_lm, pool, bias_init=[-0.5, 0.5]):  # official N=2 start: w = (0, 1)
        torch.testing.assert_close(logits(tiny_lm), second, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="bias_init"):
        with lora_flow_attached(tiny_lm, pool, bias_init=[0.0, 0.0, 0.0]):
            pass


def test_kv_cache_matches_full_forward(tiny_lm, make_pool):
    pool = make_pool(3)
    ids = encode(tiny_lm, PROMPTS[:1])["input_ids"]
    with lora_flow_attached(tiny_lm, pool) as router, torch.no_grad():
        randomize(router)
        full = tiny_lm.model(ids).logits[:, -1]
        prefix = tiny_lm.model(ids[:, :-1], use_cache=True)
        step = tiny_lm.model(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_only_gates_receive_gradients(tiny_lm, make_pool):
    pool = make_pool(3)
    examples = fit_examples(3)
    with lora_flow_attached(tiny_lm, pool) as router:
        randomize(router)
        tiny_lm.loss([e.input for e in examples], [e.target for e in examples]).backward()
        assert not [n for n, p in tiny_lm.model.named_parameters() if p.requires_grad or p.grad is not None]
        for name, p in router.gates.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_lowers_fit_loss_and_reports(tiny_lm, make_pool):
    pool = make_pool(3)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    variants = []
    for composed in LoraFlow(flow_cfg()).compose(context(tiny_lm, pool)):
        variants.append(composed.variant)
        report = composed.report
        assert isinstance(composed.generate(PROMPTS[:1], max_new_tokens=3)[0], str)
    assert variants == [""]
    assert report.examples == 6 and report.steps == 3 * 3 and report.seconds > 0
    assert report.trained_params == 2 * (3 * 64 + 3)
    assert report.info["final_fit_loss"] < report.info["initial_fit_loss"]
    for weights in report.info["gate_stats"].values():
        assert len(weights) == 3
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_save_and_reload_gives_identical_outputs(tiny_lm, make_pool, tmp_path):
    pool = make_pool(3)
    for composed in LoraFlow(flow_cfg(epochs=1)).compose(context(tiny_lm, pool)):
        folder = composed.save(tmp_path / "gates")
        expected = logits(tiny_lm)
    state, config = load_gates(folder)
    assert config["method"] == "lora_flow" and config["experts"] == pool.names
    with attach_saved_gates(tiny_lm, pool, folder):
        torch.testing.assert_close(logits(tiny_lm), expected, rtol=0, atol=0)


def test_seq2seq_cross_attention(tiny_t5):
    from bench.lora.pool import ExpertPool
    from tests.conftest import random_adapter

    pool = ExpertPool(tiny_t5.model_id, [random_adapter(tiny_t5.model, f"e{i}", tiny_t5.model_id, targets=("q", "v"),
                                                         seed=i) for i in range(3)])
    with lora_flow_attached(tiny_t5, pool) as router:
        randomize(router)
        router.record = True
        tiny_t5.generate(["abc", "hello world"], max_new_tokens=3)
        # decoder blocks: one gate call per block per step, plus the cross-attention v on the encoder tokens
        assert {router.blocks[k] for k, _ in router.records} == {"encoder.block.0", "encoder.block.1",
                                                                   "decoder.block.0", "decoder.block.1"}
        router.record = False
    for composed in LoraFlow(flow_cfg(epochs=1)).compose(context(tiny_t5, pool, fit_examples(2))):
        assert math.isfinite(composed.report.info["final_fit_loss"])
        assert isinstance(composed.generate(["abc"], max_new_tokens=2)[0], str)


def test_training_schedule_and_batches():
    from methods.ops.gates import TrainConfig, batches, lr_factor

    examples = fit_examples(5)
    plan = batches(examples, 2, 6, seed=3)
    assert [len(b) for b in plan] == [2, 2, 1, 2, 2, 1]  # two epochs of 5
    assert sorted(e.input for e in plan[0] + plan[1] + plan[2]) == sorted(e.input for e in examples)
    assert plan == batches(examples, 2, 6, seed=3) and plan != batches(examples, 2, 6, seed=4)
    tc = TrainConfig.from_cfg(flow_cfg(epochs=5, batch_size=4))
    assert tc.total_steps(5) == 10
    factors = [lr_factor(s, 10, "cosine", 0.2) for s in range(10)]
    assert factors[:2] == [1 / 3, 2 / 3] and factors[2] == 1.0 and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig.from_cfg(flow_cfg(schedule="step"))
