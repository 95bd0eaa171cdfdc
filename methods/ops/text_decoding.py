"""Decoding-time composition for text (DESIGN §4, "Beyond the papers"): LoRA Switch and LoRA Composite.

The image papers (Zhong et al., 2024, Multi-LoRA Composition) switch or average experts over denoising
steps; here the step is a generated token.

- **Switch**: exactly one expert active per forward pass; generated token t is produced by a forward pass
  with expert ``(t // τ) mod N`` active (token 0 comes from the prompt's forward pass). The switch happens
  between forward passes: the engine's ``before_step(t)`` sets the gates for the forward that produces token t,
  so no step uses the previous step's expert (the one-step lag of diffusers' step-end callbacks does not
  arise). Keys/values cached for earlier positions are kept as
  they were computed (under the expert active then); the prompt is read under expert 0.
- **Composite**: at every step the next-token log-probabilities of the N experts (each alone) are averaged,
  and the greedy token is the argmax of the average. Batched: one forward of N·B rows, where row group i
  (rows i·B … i·B+B-1) uses expert i through per-row one-hot gates of the stacked layer (the engine's
  ``fanout = N``); every group's scores are replaced by the average, so all N copies pick the same token and
  each expert keeps its own KV history.

Every expert runs at ``lora_scale`` (config key, default 1; the method YAMLs set the image papers' 0.8): expert i
alone adds ``lora_scale · s_i B_i A_i x`` to each target layer, as diffusers' ``set_adapters(name, lora_scale)`` does
in the official Multi-LoRA-Composition pipelines.

Both use the stacked expert layer (`bench.lora.stacked`) and decode through the one engine (`bench.models.generation`) as
`RowHooks`: the same tokenization, batching and decoding as `LanguageModel.generate`. They work for causal and
seq2seq models.

Entry points for the lead's `lora_switch` / `lora_composite` methods when ``ctx.model`` is a
`LanguageModel`: the generator functions `text_switch_compose(ctx, cfg)` and `text_composite_compose(ctx,
cfg)` (config keys: ``tau`` (switch, default 5), ``lora_scale`` (default 1), ``experts`` (optional list of expert
names), ``n`` (optional: sample n experts with the run's seed)).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, set_gates, stacked_experts
from bench.models.generation import RowHooks
from methods.base import Composed, FitContext, FitReport


def active_expert(t: int, n_experts: int, tau: int) -> int:
    """The expert that produces generated token t under LoRA Switch: ``(t // τ) mod N``."""
    return (t // tau) % n_experts


def text_switch_schedule(num_tokens: int, n_experts: int, tau: int) -> list[int]:
    """The active expert for each of `num_tokens` generated tokens."""
    if tau < 1 or n_experts < 1:
        raise ConfigError(f"LoRA Switch needs tau ≥ 1 and at least one expert (tau={tau}, N={n_experts})")
    return [active_expert(t, n_experts, tau) for t in range(num_tokens)]


def _select_pool(ctx: FitContext, cfg) -> ExpertPool:
    names = cfg.get("experts") if cfg is not None else None
    pool = ctx.pool.subset(list(names)) if names else ctx.pool
    n = cfg.get("n") if cfg is not None else None
    return pool.sample(int(n), ctx.seed) if n is not None else pool


def lora_scale_of(cfg) -> float:
    """``method.lora_scale`` (default 1): the factor on every expert's delta; must be finite."""
    scale = float(cfg.get("lora_scale", 1.0)) if cfg is not None else 1.0
    if not math.isfinite(scale):
        raise ConfigError(f"method.lora_scale={scale}: must be a finite number")
    return scale


# --------------------------------------------------------------------------- Composite


class CompositeHooks(RowHooks):
    """Engine hooks: N expert-major copies of every example, copy i under expert i alone (one-hot gates at
    `scale`); per-example scores are the mean over copies of ``log_softmax(logits)``."""

    def __init__(self, layers: dict[str, StackedLoraLinear], n_experts: int, scale: float, device) -> None:
        self.layers, self.fanout, self.scale, self.device = layers, n_experts, scale, device

    def _gate(self, b: int) -> None:
        rows = torch.arange(self.fanout, device=self.device).repeat_interleave(b)  # row group i -> expert i
        dtype = next(iter(self.layers.values())).weight.dtype
        set_gates(self.layers, self.scale * torch.nn.functional.one_hot(rows, self.fanout).to(dtype))

    def start(self, index: list[int], prompts: list[str]) -> None:
        self._gate(len(index))

    def select(self, keep: torch.Tensor) -> None:
        self._gate(len(keep))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.view(self.fanout, -1, logp.shape[-1]).mean(0)

    def end(self) -> None:
        set_gates(self.layers, torch.zeros(self.fanout, device=self.device))


def text_composite_compose(ctx: FitContext, cfg=None) -> Iterator[Composed]:
    """Generator: yields the Composite model (`CompositeHooks` over the pool's experts, stacked layers in place)."""
    pool, scale = _select_pool(ctx, cfg), lora_scale_of(cfg)
    with stacked_experts(ctx.model.model, pool) as layers:
        set_gates(layers, torch.zeros(len(pool), device=ctx.model.device))
        report = FitReport(info={"experts": pool.names, "decoding": "composite", "average": "log-probabilities",
                                 "lora_scale": scale})
        hooks = CompositeHooks(layers, len(pool), scale, ctx.model.device)
        yield Composed(ctx.model, report, "", None, hooks=hooks)


# --------------------------------------------------------------------------- Switch


class SwitchHooks(RowHooks):
    """Engine hooks: before the forward that produces token t, expert ``(t // τ) mod N`` alone (at `scale`) for
    every row; `trace` records the expert behind each token of the last batch."""

    def __init__(self, layers: dict[str, StackedLoraLinear], n_experts: int, tau: int, scale: float, device) -> None:
        self.layers, self.n, self.tau = layers, n_experts, tau
        self.eye = scale * torch.eye(n_experts, device=device)
        self.trace: list[int] = []

    def start(self, index: list[int], prompts: list[str]) -> None:
        self.trace = []

    def before_step(self, t: int) -> None:
        expert = active_expert(t, self.n, self.tau)
        self.trace.append(expert)
        set_gates(self.layers, self.eye[expert])

    def end(self) -> None:
        set_gates(self.layers, torch.zeros(self.n, device=self.eye.device))


def text_switch_compose(ctx: FitContext, cfg=None) -> Iterator[Composed]:
    """Generator: yields the Switch model (`SwitchHooks` over the pool's experts, stacked layers in place)."""
    tau = int(cfg.get("tau", 5)) if cfg is not None else 5
    if tau < 1:
        raise ConfigError(f"method.tau={tau}: must be ≥ 1 (tokens per expert)")
    pool, scale = _select_pool(ctx, cfg), lora_scale_of(cfg)
    with stacked_experts(ctx.model.model, pool) as layers:
        set_gates(layers, torch.zeros(len(pool), device=ctx.model.device))
        report = FitReport(info={"experts": pool.names, "decoding": "switch", "tau": tau, "lora_scale": scale})
        hooks = SwitchHooks(layers, len(pool), tau, scale, ctx.model.device)
        yield Composed(ctx.model, report, "", None, hooks=hooks)
