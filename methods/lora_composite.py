"""`method=lora_composite`: LoRA Composite (Multi-LoRA Composition, Zhong et al. 2024), DESIGN §4.

At every denoising step the model runs once per expert (only that expert active, at ``lora_scale``) on the guidance
batch ``[uncond; cond]``; the unconditional and the conditional predictions are averaged across experts and then
classifier-free guidance is applied (the sampler does that after `bench.diffusion.composite_noise`).
Forms (``method.form``):
``batched`` (default: one model call with batch 2B·N, expert i on rows i·2B … (i+1)·2B − 1) or ``serial`` (N calls);
``both`` yields both as two variants. They agree to rounding (tested). When the experts target the text encoder,
expert i's rows read the prompt embedding made with expert i.
"""

from __future__ import annotations

from typing import Iterator

import torch

from bench.diffusion import HookedModel, composite_noise
from bench.errors import ConfigError
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method

FORMS = ("batched", "serial", "both")


class CompositeHooks:
    """Sampling hooks (see `bench.diffusion.SamplingHooks`): every expert at every step, predictions averaged."""

    def __init__(self, mix, scale: float, batched: bool) -> None:
        self.mix, self.scale, self.batched = mix, scale, batched

    def embed(self, model, prompts: list[str], negative: list[str], guidance: bool) -> list[torch.Tensor]:
        return model.expert_embeddings(self.mix, prompts, negative, guidance, self.scale)

    def noise(self, model, latents: torch.Tensor, t: torch.Tensor, step: int,
              embeds: list[torch.Tensor]) -> torch.Tensor:
        return composite_noise(model.unet_noise, self.mix, latents, t, embeds, self.scale, self.batched)


@register_method("lora_composite")
class LoraComposite(Method):
    domains = ("nlp", "vl")

    def check_config(self) -> None:
        if self.cfg.get("form", "batched") not in FORMS:
            raise ConfigError(f"method.form={self.cfg.form!r}; choose one of {FORMS}")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") != "vl":  # language models: the decoding-time text form
            from methods.text_decoding import text_composite_compose

            yield from text_composite_compose(ctx, self.cfg)
            return
        form, scale = self.cfg.get("form", "batched"), float(self.cfg.get("lora_scale", 0.8))
        forms = ["batched", "serial"] if form == "both" else [form]
        with ctx.model.experts_applied(ctx.pool) as mix:
            for each in forms:
                report = FitReport(info={"form": each, "lora_scale": scale, "experts": ctx.pool.names})
                variant = f"form={each}" if form == "both" else ""
                yield Composed(HookedModel(ctx.model, CompositeHooks(mix, scale, each == "batched")), report, variant)
