"""Grouped-query decode attention (bench/models/decode_attention.py) against attention written from its definition:
for query head h, softmax(q_h·K_g^T · scale + mask) V_g with g = h // (heads / kv_heads)."""

from __future__ import annotations

import pytest
import torch

from bench.models.decode_attention import NAME, grouped_decode_attention, grouped_decoding


def reference(query, key, value, mask, scale):
    """Per query head, from the definition (float64 loops over heads)."""
    b, heads, q_len, d = query.shape
    groups = heads // key.shape[1]
    out = torch.empty(b, q_len, heads, d, dtype=query.dtype)
    for h in range(heads):
        g = h // groups
        scores = query[:, h] @ key[:, g].transpose(-1, -2) * scale  # (b, q, L)
        if mask is not None:
            scores = scores + (mask[:, 0] if mask.dtype != torch.bool
                               else torch.where(mask[:, 0], 0.0, float("-inf")).to(scores.dtype))
        out[:, :, h] = torch.softmax(scores, -1) @ value[:, g]
    return out


class Attention(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = heads // kv_heads, True


@pytest.mark.parametrize("mask_kind", ["none", "additive", "bool"])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 2), (4, 4)])
def test_grouped_decode_attention_is_attention(mask_kind, heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, length, d = 5, 23, 16
    q = torch.randn(b, heads, 1, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv_heads, length, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv_heads, length, d, generator=g, dtype=torch.float64)
    keep = torch.rand(b, 1, 1, length, generator=g) > 0.3
    keep[..., -1] = True  # the token itself
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(b, 1, 1, length, dtype=torch.float64).masked_fill(~keep, torch.finfo(
                torch.float64).min)}[mask_kind]
    got, weights = grouped_decode_attention(Attention(heads, kv_heads), q, k, v, mask, scaling=0.3)
    assert weights is None
    torch.testing.assert_close(got, reference(q, k, v, mask, 0.3), rtol=1e-12, atol=1e-12)


def test_prompt_forwards_are_transformers_sdpa():
    """Several query tokens: the call is transformers' own SDPA attention, causal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 7, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got, _ = grouped_decode_attention(Attention(6, 2), q, k, v, None, scaling=0.5)
    expected, _ = sdpa_attention_forward(Attention(6, 2), q, k, v, None, scaling=0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_grouped_decoding_switches_an_sdpa_model_and_restores_it(tiny_lm, monkeypatch):
    """Inside the block the model's decode steps go through the grouped function (counted) and generations are
    the plain SDPA model's; afterwards the model is SDPA again."""
    import bench.models.decode_attention as module

    config = tiny_lm.model.config
    assert config._attn_implementation == "sdpa" and config.num_key_value_heads < config.num_attention_heads
    calls = []
    original = module.grouped_decode_attention

    def counted(*args, **kwargs):
        calls.append(args[1].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "grouped_decode_attention", counted)
    prompts = ["Q: add 2 and 3\nA:", "Q: a much longer question about apples, pears and plums\nA:"]
    with grouped_decoding(tiny_lm.model):
        assert config._attn_implementation == NAME
        rows = [tiny_lm.prompt_ids(p) for p in prompts]
        from bench.models.generation import decode_causal

        grouped = decode_causal(tiny_lm.model, rows, 6, [], tiny_lm.tokenizer.pad_token_id)
    assert config._attn_implementation == "sdpa"
    assert 1 in calls and max(calls) > 1  # decode steps and the prompt forward both came through
    plain = decode_causal(tiny_lm.model, rows, 6, [], tiny_lm.tokenizer.pad_token_id)
    assert grouped == plain
