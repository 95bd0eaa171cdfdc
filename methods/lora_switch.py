"""`method=lora_switch`: LoRA Switch (Multi-LoRA Composition, Zhong et al. 2024), DESIGN §4.

Exactly one expert is active at each denoising step; the active one advances every τ steps, cycling through the pool
in order: step i uses expert ``(i // τ) mod N`` (`switch_schedule`). Each expert is applied at ``lora_scale`` (0.8 in
the paper).

Text encoder (``method.text_encoder``), when the experts also target it. ``official`` (default): the prompt (and the
negative prompt) is encoded once, with the first expert alone in the text encoder at ``lora_scale``, and every step
reads that embedding, as in the official code (maszhongming/Multi-LoRA-Composition at cac122a): ``compose_lora.py``
(and ``example.py``) call ``pipeline.set_adapters([cur_loras[0]])`` before the pipeline call (compose_lora.py
l. 72-73), and the custom pipeline ``pipeline/pipeline_0.26.3.py`` runs ``encode_prompt`` once, before the denoising
loop, with ``lora_scale = cross_attention_kwargs["scale"]`` (l. 963-976), applied to the text encoder's LoRA layers by
``scale_lora_layers`` (l. 357-364); the switching callback (``callbacks.py``) changes the adapters after that, so it
never reaches the prompt embedding. ``per_expert``: the prompt is encoded once per expert (expert i alone at
``lora_scale``) and step i reads the embedding of its active expert.

The off-by-one: diffusers' ``callback_on_step_end`` runs *after* step i, so a switch made there first acts at step
i+1; the official callback (switch at the end of steps τ, 2τ, …) gives the first expert τ+1 steps. Our sampler asks
the method for step i's prediction before making it, so step i uses exactly ``schedule[i]``; `step_end_callback`
is the matching callback for a stock ``StableDiffusionPipeline`` (it activates ``schedule[i + 1]`` at the end of
step i). The schedule function is shared with the text form of Switch (switch every τ tokens).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from bench.errors import ConfigError
from bench.models.diffusion import HookedModel
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method

TEXT_ENCODER = ("official", "per_expert")


def active_expert(step: int, n_experts: int, tau: int) -> int:
    """The expert active at (0-based) step `step`."""
    return (step // tau) % n_experts


def switch_schedule(num_steps: int, n_experts: int, tau: int) -> list[int]:
    """The active expert of every step: ``[0]*τ + [1]*τ + … `` cycling over `n_experts`."""
    if n_experts < 1 or tau < 1 or num_steps < 0:
        raise ConfigError(f"switch schedule needs n_experts ≥ 1 and tau ≥ 1 (got n_experts={n_experts}, tau={tau})")
    return [active_expert(i, n_experts, tau) for i in range(num_steps)]


def step_end_callback(schedule: list[int], activate: Callable[[int], None]):
    """A diffusers ``callback_on_step_end`` that makes step i use ``schedule[i]`` (call ``activate(schedule[0])``
    before the pipeline): at the end of step i it activates the expert of step i+1."""

    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step + 1 < len(schedule) and schedule[step + 1] != schedule[step]:
            activate(schedule[step + 1])
        return {}

    return callback


class SwitchHooks:
    """Sampling hooks (see `bench.models.diffusion.SamplingHooks`): expert ``(step // τ) mod N`` alone at each step.
    `text_encoder`: ``official`` (one embedding, first expert in the text encoder) or ``per_expert``."""

    def __init__(self, mix, tau: int, scale: float, text_encoder: str = "official") -> None:
        if text_encoder not in TEXT_ENCODER:
            raise ConfigError(f"method.text_encoder={text_encoder!r}; choose one of {TEXT_ENCODER}")
        self.mix, self.tau, self.scale, self.text_encoder = mix, tau, scale, text_encoder

    def embed(self, model, prompts: list[str], negative: list[str], guidance: bool) -> list[torch.Tensor]:
        mode = "first" if self.text_encoder == "official" else "per_expert"
        return model.expert_embeddings(self.mix, prompts, negative, guidance, self.scale, mode=mode)

    def noise(self, model, latents: torch.Tensor, t: torch.Tensor, step: int, embeds: list[Any]) -> torch.Tensor:
        expert = active_expert(step, self.mix.n, self.tau)
        self.mix.only(expert, self.scale)
        return model.unet_noise(latents, t, embeds[expert])


@register_method("lora_switch")
class LoraSwitch(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return self.cfg.get("n") is not None  # fixed pool order, no fit examples, greedy / fixed-noise sampling

    def check_config(self) -> None:
        if int(self.cfg.get("tau", 5)) < 1:
            raise ConfigError(f"method.tau={self.cfg.tau}: must be ≥ 1 denoising step")
        if self.cfg.get("text_encoder", "official") not in TEXT_ENCODER:
            raise ConfigError(f"method.text_encoder={self.cfg.text_encoder!r}; choose one of {TEXT_ENCODER}")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") != "vl":  # language models: the decoding-time text form
            from methods.ops.text_decoding import text_switch_compose

            yield from text_switch_compose(ctx, self.cfg)
            return
        tau, scale = int(self.cfg.get("tau", 5)), float(self.cfg.get("lora_scale", 0.8))
        text_encoder = str(self.cfg.get("text_encoder", "official"))
        with ctx.model.experts_applied(ctx.pool) as mix:
            report = FitReport(info={"tau": tau, "lora_scale": scale, "order": ctx.pool.names,
                                     "text_encoder": text_encoder})
            yield Composed(HookedModel(ctx.model, SwitchHooks(mix, tau, scale, text_encoder)), report)
