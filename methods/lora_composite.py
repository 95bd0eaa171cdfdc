"""`method=lora_composite`: LoRA Composite (Multi-LoRA Composition, Zhong et al. 2024), DESIGN §4.

At every denoising step the model runs once per expert (only that expert active, at ``lora_scale``) on the guidance
batch ``[uncond; cond]``; the unconditional and the conditional predictions are averaged across experts and then
classifier-free guidance is applied (the sampler does that after `bench.models.diffusion.composite_noise`).
Forms (``method.form``):
``batched`` (default: one model call with batch 2B·N, expert i on rows i·2B … (i+1)·2B − 1) or ``serial`` (N calls);
``both`` yields both as two variants. They agree to rounding (tested).

Text encoder (``method.text_encoder``), when the experts also target it. ``official`` (default): the prompt (and the
negative prompt) is encoded once with every expert active in the text encoder at once, each at ``lora_scale``
(``W + Σ_i lora_scale·s_i B_i A_i``), and every expert's UNet call reads that one embedding, as in the official code
(maszhongming/Multi-LoRA-Composition at cac122a): ``compose_lora.py`` calls ``pipeline.set_adapters(cur_loras)`` (no
weights: 1.0 each, for the UNet and the text encoder) before the pipeline call (l. 79-80), and the custom pipeline
``pipeline/pipeline_0.26.3.py`` runs ``encode_prompt`` once, before the loop, with ``lora_scale =
cross_attention_kwargs["scale"]`` (l. 963-976), which ``scale_lora_layers`` multiplies into every active text-encoder
LoRA (l. 357-364); only the UNet calls switch adapters, one per expert (``self.set_adapters(adapter)`` inside the loop,
l. 1037-1051). ``per_expert``: the prompt is encoded once per expert (expert i alone at ``lora_scale``) and expert i's
rows read expert i's embedding.
"""

from __future__ import annotations

from typing import Iterator

import torch

from bench.errors import ConfigError
from bench.models.diffusion import HookedModel, composite_noise
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method

FORMS = ("batched", "serial", "both")
TEXT_ENCODER = ("official", "per_expert")


class CompositeHooks:
    """Sampling hooks (see `bench.models.diffusion.SamplingHooks`): every expert at every step, predictions averaged.
    `text_encoder`: ``official`` (one embedding, all experts in the text encoder) or ``per_expert``."""

    def __init__(self, mix, scale: float, batched: bool, text_encoder: str = "official") -> None:
        if text_encoder not in TEXT_ENCODER:
            raise ConfigError(f"method.text_encoder={text_encoder!r}; choose one of {TEXT_ENCODER}")
        self.mix, self.scale, self.batched, self.text_encoder = mix, scale, batched, text_encoder

    def embed(self, model, prompts: list[str], negative: list[str], guidance: bool) -> list[torch.Tensor]:
        mode = "all" if self.text_encoder == "official" else "per_expert"
        return model.expert_embeddings(self.mix, prompts, negative, guidance, self.scale, mode=mode)

    def noise(self, model, latents: torch.Tensor, t: torch.Tensor, step: int,
              embeds: list[torch.Tensor]) -> torch.Tensor:
        return composite_noise(model.unet_noise, self.mix, latents, t, embeds, self.scale, self.batched)


@register_method("lora_composite")
class LoraComposite(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return self.cfg.get("n") is not None  # fixed pool order, no fit examples, greedy / fixed-noise sampling

    def check_config(self) -> None:
        if self.cfg.get("form", "batched") not in FORMS:
            raise ConfigError(f"method.form={self.cfg.form!r}; choose one of {FORMS}")
        if self.cfg.get("text_encoder", "official") not in TEXT_ENCODER:
            raise ConfigError(f"method.text_encoder={self.cfg.text_encoder!r}; choose one of {TEXT_ENCODER}")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") != "vl":  # language models: the decoding-time text form
            from methods.ops.text_decoding import text_composite_compose

            yield from text_composite_compose(ctx, self.cfg)
            return
        form, scale = self.cfg.get("form", "batched"), float(self.cfg.get("lora_scale", 0.8))
        forms = ["batched", "serial"] if form == "both" else [form]
        text_encoder = str(self.cfg.get("text_encoder", "official"))
        with ctx.model.experts_applied(ctx.pool) as mix:
            for each in forms:
                report = FitReport(info={"form": each, "lora_scale": scale, "experts": ctx.pool.names,
                                         "text_encoder": text_encoder})
                variant = f"form={each}" if form == "both" else ""
                hooks = CompositeHooks(mix, scale, each == "batched", text_encoder)
                yield Composed(HookedModel(ctx.model, hooks), report, variant)
