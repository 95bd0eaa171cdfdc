"""Grouped-query attention of one-token decode steps without copying keys and values per query head.

Transformers' SDPA attention repeats every key/value head ``num_key_value_groups`` times (`repeat_kv`, a copy of
the whole cache per layer and step) whenever there is an attention mask, because SDPA's ``enable_gqa`` with a
mask falls back to its math kernel. Batched decoding always has a mask (left padding), and on the H200 the
copies were a third of the GPU time of decoding SmolLM2-135M (3 KV heads, 9 query heads). With one query token,
the copy is unnecessary: the ``groups`` query heads that share KV head g (heads ``g·groups … g·groups+groups-1``,
the order of `repeat_kv`) are ``groups`` query rows of one attention over that head's keys, under the same mask.
`grouped_decode_attention` computes exactly that (the same dot products, softmax and weighted sum per query
head); every other call (prompt forwards, models without grouped heads, position biases) goes to transformers'
own ``sdpa_attention_forward``.

It is registered with transformers' `AttentionInterface` (and SDPA's mask builder with `AttentionMaskInterface`)
under `NAME` — the extension point transformers documents for custom attention — and `grouped_decoding(model)`
switches an SDPA model to it for the span of a block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

NAME = "bench_grouped_decode_sdpa"


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature; query ``(b, heads, q, d)``, key/value ``(b, kv_heads, L, d)``,
    returns ``(b, q, heads, d)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    mask_is_per_row = attention_mask is None or (attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1)
    if (q_len != 1 or heads == kv_heads or kwargs.get("position_bias") is not None or not mask_is_per_row
            or dropout or value.shape[-1] != d):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = heads // kv_heads
    grouped = query.reshape(b, kv_heads, groups, d)  # query head g·groups + r -> KV head g, query row r
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length].expand(b, 1, groups, length)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def grouped_decoding(model: torch.nn.Module) -> Iterator[None]:
    """`model` (its config and every sub-module's config) attends through `grouped_decode_attention` for the span
    of the block, if it used SDPA; any other attention is left as it is."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    if not configs:
        yield
        return
    _register()
    for config in configs.values():
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"
