"""Decoding-time composition for text (DESIGN §4, "Beyond the papers"): LoRA Switch and LoRA Composite.

The image papers (Zhong et al., 2024, Multi-LoRA Composition) switch or average experts over denoising
steps; here the step is a generated token.

- **Switch**: exactly one expert active per forward pass; generated token t is produced by a forward pass
  with expert ``(t // τ) mod N`` active (token 0 comes from the prompt's forward pass). The switch happens
  between forward passes: a logits processor, called after the forward that produced token t's logits,
  sets the gates for the next forward (token t+1), so no step uses the previous step's expert (the one-step
  lag of diffusers' step-end callbacks does not arise). Keys/values cached for earlier positions are kept as
  they were computed (under the expert active then); the prompt is read under expert 0.
- **Composite**: at every step the next-token log-probabilities of the N experts (each alone) are averaged,
  and the greedy token is the argmax of the average. Batched: one forward of N·B rows, where row group i
  (rows i·B … i·B+B-1) uses expert i through per-row one-hot gates of the stacked layer; a logits processor
  replaces every group's scores by the average, so all N copies pick the same token and share one KV
  history per expert.

Both use the stacked expert layer (`bench.stacked`), greedy decoding with the KV cache through
``model.generate`` and the same tokenization, padding (left for causal LMs) and decoding as
`LanguageModel.generate`. They work for causal and seq2seq models.

Entry points for the lead's `lora_switch` / `lora_composite` methods when ``ctx.model`` is a
`LanguageModel`: the generator functions `text_switch_compose(ctx, cfg)` and `text_composite_compose(ctx,
cfg)` (config keys: ``tau`` (switch, default 5), ``experts`` (optional list of expert names), ``n`` (optional:
sample n experts with the run's seed)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from bench.errors import ConfigError
from bench.lm import LanguageModel, _pad
from bench.pool import ExpertPool
from bench.stacked import StackedLoraLinear, set_gates, stacked_experts
from methods.base import Composed, FitContext, FitReport


def active_expert(t: int, n_experts: int, tau: int) -> int:
    """The expert that produces generated token t under LoRA Switch: ``(t // τ) mod N``."""
    return (t // tau) % n_experts


def text_switch_schedule(num_tokens: int, n_experts: int, tau: int) -> list[int]:
    """The active expert for each of `num_tokens` generated tokens."""
    if tau < 1 or n_experts < 1:
        raise ConfigError(f"LoRA Switch needs tau ≥ 1 and at least one expert (tau={tau}, N={n_experts})")
    return [active_expert(t, n_experts, tau) for t in range(num_tokens)]


# --------------------------------------------------------------------------- shared decoding helpers


def encode_prompts(lm: LanguageModel, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask exactly as `LanguageModel.generate` builds them (left padding for causal)."""
    ids = [lm._ids(lm.format_prompt(p))[-lm.max_input_tokens :] for p in prompts]
    side = "right" if lm.is_seq2seq else "left"
    input_ids = _pad(ids, lm.tokenizer.pad_token_id, side=side).to(lm.device)
    mask = _pad([[1] * len(r) for r in ids], 0, side=side).to(lm.device)
    return input_ids, mask


@torch.no_grad()
def greedy_generate(lm: LanguageModel, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                    processors: list | None = None) -> torch.Tensor:
    """The new token ids (greedy, KV cache) of `lm.model.generate` with extra logits processors."""
    from transformers import LogitsProcessorList

    tok = lm.tokenizer
    out = lm.model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=tok.pad_token_id, eos_token_id=lm.stop_token_ids(), temperature=None, top_p=None, top_k=None,
        logits_processor=LogitsProcessorList(processors or []),
    )
    return out if lm.is_seq2seq else out[:, input_ids.shape[1] :]


def _select_pool(ctx: FitContext, cfg) -> ExpertPool:
    names = cfg.get("experts") if cfg is not None else None
    pool = ctx.pool.subset(list(names)) if names else ctx.pool
    n = cfg.get("n") if cfg is not None else None
    return pool.sample(int(n), ctx.seed) if n is not None else pool


def _chunks(prompts: Sequence[str], batch_size: int, progress: bool, desc: str):
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield list(prompts[i : i + batch_size])


# --------------------------------------------------------------------------- Composite


class AverageLogProbs:
    """Logits processor: rows are N groups of B; every group's scores become the mean over groups of
    ``log_softmax(scores)`` (optionally weighted), so greedy decoding picks one token for all N copies."""

    def __init__(self, n_experts: int, weights: torch.Tensor | None = None) -> None:
        self.n = n_experts
        self.weights = weights

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, vocab = scores.shape
        logp = torch.log_softmax(scores.float(), dim=-1).view(self.n, rows // self.n, vocab)
        if self.weights is None:
            avg = logp.mean(0)
        else:
            w = self.weights.to(logp.device, logp.dtype).view(-1, 1, 1)
            avg = (w * logp).sum(0)
        return avg.repeat(self.n, 1).to(scores.dtype)


@dataclass
class TextCompositeComposed(Composed):
    """LoRA Composite for text: per-step average of the experts' next-token log-probabilities."""

    layers: dict[str, StackedLoraLinear] = field(default_factory=dict)
    n_experts: int = 1

    def generate(self, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 8, progress: bool = False,
                 desc: str = "generate", **_) -> list[str]:
        lm, n = self.model, self.n_experts
        outputs: list[str] = []
        for chunk in _chunks(prompts, batch_size, progress, desc):
            input_ids, mask = encode_prompts(lm, chunk)
            b = input_ids.shape[0]
            rows = torch.arange(n, device=lm.device).repeat_interleave(b)  # row group i -> expert i
            set_gates(self.layers, torch.nn.functional.one_hot(rows, n).to(lm.model.dtype))
            try:
                new = greedy_generate(lm, input_ids.repeat(n, 1), mask.repeat(n, 1), max_new_tokens,
                                      [AverageLogProbs(n)])
            finally:
                set_gates(self.layers, torch.zeros(n, device=lm.device))
            outputs.extend(lm.decode_until_stop(new[:b].tolist()))
        return outputs


def text_composite_compose(ctx: FitContext, cfg=None) -> Iterator[Composed]:
    """Generator: yields a `TextCompositeComposed` over the pool's experts (stacked layers in place)."""
    pool = _select_pool(ctx, cfg)
    with stacked_experts(ctx.model.model, pool) as layers:
        set_gates(layers, torch.zeros(len(pool), device=ctx.model.device))
        report = FitReport(info={"experts": pool.names, "decoding": "composite", "average": "log-probabilities"})
        yield TextCompositeComposed(ctx.model, report, "", None, layers=layers, n_experts=len(pool))


# --------------------------------------------------------------------------- Switch


class SwitchExperts:
    """Logits processor with a side effect: after the forward that produced token t's logits, activate the
    expert of token t+1 for the next forward. `trace` records the expert behind each produced token."""

    def __init__(self, layers: dict[str, StackedLoraLinear], n_experts: int, tau: int, device) -> None:
        self.layers, self.n, self.tau = layers, n_experts, tau
        self.eye = torch.eye(n_experts, device=device)
        self.t = 0
        self.trace: list[int] = []
        self.activate(0)

    def activate(self, expert: int) -> None:
        self.active = expert
        set_gates(self.layers, self.eye[expert])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.trace.append(self.active)  # the forward that produced these scores ran with this expert
        self.t += 1
        self.activate(active_expert(self.t, self.n, self.tau))
        return scores


@dataclass
class TextSwitchComposed(Composed):
    """LoRA Switch for text: one expert active at a time, cycling every τ generated tokens."""

    layers: dict[str, StackedLoraLinear] = field(default_factory=dict)
    n_experts: int = 1
    tau: int = 5
    last_trace: list[int] = field(default_factory=list)  # experts behind the tokens of the last chunk

    def generate(self, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 8, progress: bool = False,
                 desc: str = "generate", **_) -> list[str]:
        lm = self.model
        outputs: list[str] = []
        for chunk in _chunks(prompts, batch_size, progress, desc):
            input_ids, mask = encode_prompts(lm, chunk)
            switch = SwitchExperts(self.layers, self.n_experts, self.tau, lm.device)
            try:
                new = greedy_generate(lm, input_ids, mask, max_new_tokens, [switch])
            finally:
                set_gates(self.layers, torch.zeros(self.n_experts, device=lm.device))
            self.last_trace = switch.trace
            outputs.extend(lm.decode_until_stop(new.tolist()))
        return outputs


def text_switch_compose(ctx: FitContext, cfg=None) -> Iterator[Composed]:
    """Generator: yields a `TextSwitchComposed` over the pool's experts (stacked layers in place)."""
    tau = int(cfg.get("tau", 5)) if cfg is not None else 5
    if tau < 1:
        raise ConfigError(f"method.tau={tau}: must be ≥ 1 (tokens per expert)")
    pool = _select_pool(ctx, cfg)
    with stacked_experts(ctx.model.model, pool) as layers:
        set_gates(layers, torch.zeros(len(pool), device=ctx.model.device))
        report = FitReport(info={"experts": pool.names, "decoding": "switch", "tau": tau})
        yield TextSwitchComposed(ctx.model, report, "", None, layers=layers, n_experts=len(pool), tau=tau)
