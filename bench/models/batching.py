"""Forward batches by a token budget: rows sorted by length and cut so each batch's padded size stays within it.

Generation (`bench.models.generation`) and teacher-forced losses (`LanguageModel.loss`, LoraHub's candidate losses, MoA's
features) plan their batches here; the budgets default to what the device holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_TOKEN_BUDGET = 16384  # padded tokens per batch on CPU (prompt + new tokens, all rows)
CUDA_MEMORY_SHARE = 0.25  # of the free device memory, for one batch's KV cache
DEFAULT_LOSS_TOKEN_BUDGET = 4096  # padded tokens per teacher-forced forward on CPU (logits: vocabulary × 4 B each)


@dataclass
class Batch:
    index: list[int]  # input positions of the rows, longest prompt first
    width: int  # longest prompt (tokens)


def plan_batches(lengths: Sequence[int], max_new_tokens: int, token_budget: int,
                 max_rows: int | None = None) -> list[Batch]:
    """Rows sorted by length (longest first, ties in input order) and cut so that every batch's padded size
    ``rows × (longest + max_new_tokens)`` is at most `token_budget` (a row that alone exceeds it is a batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[Batch] = []
    for i in order:
        current = batches[-1] if batches else None
        if (current is not None and (len(current.index) + 1) * (current.width + max_new_tokens) <= token_budget
                and (max_rows is None or len(current.index) < max_rows)):
            current.index.append(i)
        else:
            batches.append(Batch([i], lengths[i]))
    return batches


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV cache one token takes in `model` (all layers, keys and values), from its config."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    layers = int(getattr(config, "num_hidden_layers", getattr(config, "num_layers", 1)))
    heads = int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", 1))
    hidden = int(getattr(config, "hidden_size", getattr(config, "d_model", 1)))
    head_dim = int(getattr(config, "head_dim", None) or hidden // max(int(getattr(config, "num_attention_heads", 1)), 1))
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * layers * heads * head_dim * dtype_bytes


def default_token_budget(model: torch.nn.Module) -> int:
    """`DEFAULT_TOKEN_BUDGET` on CPU; on CUDA the tokens whose KV cache fits in a share of free memory (at
    least the CPU budget)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return DEFAULT_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    # activations and the prompt forward's temporaries are charged like four more caches
    return max(DEFAULT_TOKEN_BUDGET, int(CUDA_MEMORY_SHARE * free / (5 * kv_bytes_per_token(model))))


def loss_token_budget(model: torch.nn.Module) -> int:
    """Padded tokens per teacher-forced forward: `DEFAULT_LOSS_TOKEN_BUDGET` on CPU; on CUDA what a share of the
    free memory holds at the float32 logits, their softmax and gradient (3 × vocabulary × 4 B per token) plus the
    activations a backward keeps (≈ 16 hidden vectors per layer)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return DEFAULT_LOSS_TOKEN_BUDGET
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    vocab = int(getattr(config, "vocab_size", 32000))
    layers = int(getattr(config, "num_hidden_layers", getattr(config, "num_layers", 1)))
    hidden = int(getattr(config, "hidden_size", getattr(config, "d_model", 1)))
    per_token = 12 * vocab + 16 * layers * hidden * next(model.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return max(DEFAULT_LOSS_TOKEN_BUDGET, int(CUDA_MEMORY_SHARE * free / per_token))


def pad_rows(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    """`rows` of token ids padded with `value` on the left or right to the longest: a (rows, longest) tensor of longs."""
    width = max(len(r) for r in rows)
    padded = [([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)
