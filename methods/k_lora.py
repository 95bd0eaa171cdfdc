"""`method=k_lora`: K-LoRA (Ouyang, Li, Hou, CVPR 2025, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and
Style LoRAs"): training-free fusion of one subject LoRA and one style LoRA at sampling time.

Source: the official code, github.com/HVision-NKU/K-LoRA at commit 893d0f9622eca7f8ecf4d4fb3f0bc1619b66ad48
(2025-06-09): ``klora.py`` (``KLoRALinearLayer.get_klora_weight`` / ``forward``), ``utils.py``
(``get_ratio_between_content_and_style``, ``insert_sd_klora_to_unet``, ``insert_community_flux_lora_to_unet``) and
``inference_sd.py`` (the SDXL defaults). The official "LoRA 1" (content) is our subject, "LoRA 2" our style.

The rule. In each K-LoRA layer l (a LoRA'd linear of the UNet; which ones: ``method.layers`` below) with updates
``ΔW_1 = s_1 B_1 A_1`` (subject) and ``ΔW_2 = s_2 B_2 A_2`` (style), ranks r_1, r_2 at that layer:

    K      = r_1 · r_2                                        (klora.py: ``weight_1_a.shape[1] * weight_2_a.shape[1]``)
    S_i    = Σ of the K largest entries of |ΔW_i|             (``torch.topk(|ΔW_i|.flatten(), K).values.sum()``)
    γ      = mean over layers of ρ_l = Σ|ΔW_1,l| / Σ|ΔW_2,l|, recomputed over the ρ_l < 3 · (first mean) only
             (utils.get_ratio_between_content_and_style; +∞ if none is left)
    c      = 1, 2, 3, …: the index of this K-LoRA layer call in the sampling run (the official global ``glo_count``,
             incremented by every K-LoRA layer forward, all layers and steps)
    T      = ``sum_timesteps``: the K-LoRA layer calls of one sampling run, L × steps (the FLUX code's
             ``diffuse_step * layer_nums``; the SDXL scripts' 28000 = 560 attention projections × 50 steps)
    scale  = α · (c mod T) / T + β;  pattern ``s*``: scale ← scale mod α
    layer l at call c applies the subject LoRA iff (S_1 / γ) / (S_2 · scale) > 1, else the style LoRA:
    y = W x + lora_scale · ΔW_sel x.

So with pattern ``s`` (α = 1.5, β = 0.5) the style's weight grows linearly from 0.5 to 2 over the run: the subject
wins early, the style late. With ``s*`` (the default of ``inference_sd.py`` since 2025-05-26: α = 1.5, β = 0.85 α)
the scale starts at 1.275, reaches 1.5 after 15 % of the calls, wraps to 0 (the subject wins almost everywhere just
after) and climbs back to 1.275 at the end. Within one step each layer sees its own c (the official counter does),
and the last call of the run has c mod T = 0. Our sampler makes one UNet call per step ([uncond; cond] batched, as the
SDXL pipeline does), each K-LoRA layer runs once per call, so call c is layer p (0-based, in execution order) of step
i with c = i · L + p + 1; the counter restarts with every sampling run (the official one never resets and relies on
the ``mod T`` with every image taking exactly T calls: the same thing). The selection depends on weights and c only,
never on the data.

Layers (``method.layers``). ``attention`` (default, the official SDXL code): the ``to_q`` / ``to_k`` / ``to_v`` /
``to_out.0`` of every UNet attention module the experts adapt; other LoRA'd layers of the experts are not applied at
all (the official code never inserts them), counted in ``fit_info.unused_layers``. ``all``: every LoRA'd UNet linear
(the official FLUX code for full-layer LoRAs). The text encoder always runs without LoRA: the official pipelines load
no LoRA into it (``insert_*_to_unet`` touch the denoiser only).

Pools. K-LoRA fuses exactly two LoRAs. ``method.subject`` / ``method.style`` pick them by index among the composed
set's experts (default 0 and 1; this benchmark's DreamBooth pools hold subject LoRAs only, so the second one plays
the style role). A set of more than two experts: ``method.extra: drop`` (default) fuses the two named and leaves the
rest out, listed in ``fit_info.dropped`` (and logged); ``error`` raises `ConfigError`. Fewer than two experts, or an
index past the set, raise `ConfigError` naming the key.

Deviations from the official code (on the official setting, attention-only LoRAs with alpha = r and the SDXL
scripts' 50 steps, none changes a selection, except at float ties):
ΔW includes the LoRA's own scale s_i (alpha / r; the official LoRAs have none, i.e. alpha = r, where both agree);
all sums in float64 (official: float32 on CUDA); K is clamped to the number of entries of ΔW (official: topk raises);
layers whose style update is all zero are left out of γ (official: ZeroDivisionError); γ is taken over the K-LoRA
layers (official: over every LoRA'd layer in the two files, which for its SDXL LoRAs is the same set); T is derived
from the run's step count unless ``method.sum_timesteps`` fixes it (the SDXL scripts hard-code 28000 for 50 steps);
``lora_scale`` multiplies the applied update (official: 1.0, our default).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch

from bench.errors import AdapterError, ConfigError
from bench.lora.adapters import LoraAdapter
from bench.lora.pool import ExpertPool
from bench.models.diffusion import HookedModel
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer

PATTERNS = ("s*", "s")
LAYERS = ("attention", "all")
EXTRA = ("drop", "error")
DEFAULT_BETA = {"s*": 0.85 * 1.5, "s": 0.5}  # inference_sd.py: beta = alpha * 0.85 (s*, alpha 1.5) | 0.5 (s)
ATTENTION_LEAVES = (".to_q", ".to_k", ".to_v", ".to_out.0")

log = logging.getLogger("bench")


# --------------------------------------------------------------------- the official rule, as functions


def top_k(rank_subject: int, rank_style: int, numel: int) -> int:
    """K = r_1 · r_2 (klora.py), clamped to the entries of ΔW."""
    return min(int(rank_subject) * int(rank_style), int(numel))


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the k largest |ΔW| entries, in float64."""
    return float(torch.topk(delta.double().abs().flatten(), k).values.sum())


def average_ratio(subject_sums: list[float], style_sums: list[float]) -> float:
    """γ of utils.get_ratio_between_content_and_style: mean of Σ|ΔW_subject| / Σ|ΔW_style| over layers, then the mean
    again over the ratios below 3× that mean (+∞ when none is). Layers with an all-zero style update are skipped."""
    ratios = [a / b for a, b in zip(subject_sums, style_sums) if b != 0]
    if not ratios:
        raise AdapterError("K-LoRA: the style LoRA's update is zero in every layer (no subject/style ratio)")
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept) if kept else math.inf


def time_scale(call: int, sum_timesteps: int, alpha: float, beta: float, pattern: str) -> float:
    """The style weight at K-LoRA layer call `call` (1-based): α · (call mod T) / T + β, then mod α for ``s*``."""
    scale = alpha * (call % sum_timesteps) / sum_timesteps + beta
    return scale % alpha if pattern == "s*" else scale


def choose(subject_sum: float, style_sum: float, gamma: float, scale: float) -> int:
    """0 (subject) iff (S_1 / γ) / (S_2 · scale) > 1, else 1 (style); divisions by zero as torch does them."""
    s1 = torch.tensor(subject_sum, dtype=torch.float64) / gamma
    s2 = torch.tensor(style_sum, dtype=torch.float64) * scale
    return 0 if bool(s1 / s2 > 1) else 1


def klora_layers(adapter: LoraAdapter, layers: str) -> list[str]:
    """The UNet module paths K-LoRA fuses, in the adapter's order."""
    unet = [p for p in adapter.modules if p.startswith("unet.")]
    return unet if layers == "all" else [p for p in unet if p.endswith(ATTENTION_LEAVES)]


def layer_scores(subject: LoraAdapter, style: LoraAdapter,
                 paths: list[str]) -> tuple[dict[str, tuple[float, float]], float, dict[str, int]]:
    """Per layer (S_1, S_2), γ, and per layer K."""
    sums, ks, full1, full2 = {}, {}, [], []
    for path in paths:
        m1, m2 = subject.modules[path], style.modules[path]
        d1, d2 = m1.delta(torch.float64).cpu(), m2.delta(torch.float64).cpu()
        k = ks[path] = top_k(m1.rank, m2.rank, d1.numel())
        sums[path] = (top_k_sum(d1, k), top_k_sum(d2, k))
        full1.append(float(d1.abs().sum()))
        full2.append(float(d2.abs().sum()))
    return sums, average_ratio(full1, full2), ks


# --------------------------------------------------------------------- sampling hooks


class KLoraHooks:
    """Sampling hooks (see `bench.models.diffusion.SamplingHooks`): the plain text encoder; at each UNet call every
    K-LoRA layer applies the subject or the style LoRA alone, by the official rule, through the `ExpertMix`'s gate
    (a one-hot gate per call: ``W x + lora_scale · s_sel B_sel A_sel x``). `trace` holds (step, layer path, expert)
    of every K-LoRA layer call of the last sampling run, in call order; `info` (the FitReport's) gets the fraction
    of layers that used the subject at each step."""

    def __init__(self, mix, sums: dict[str, tuple[float, float]], gamma: float, alpha: float, beta: float,
                 pattern: str, sum_timesteps: int | None, lora_scale: float, info: dict | None = None) -> None:
        self.mix, self.sums, self.gamma = mix, sums, gamma
        self.alpha, self.beta, self.pattern = alpha, beta, pattern
        self.sum_timesteps, self.lora_scale, self.info = sum_timesteps, lora_scale, info
        self.n_layers = len(mix.layers)
        self.calls, self.total, self.step = 0, 1, 0
        self.trace: list[tuple[int, str, int]] = []
        self._gates: dict[str, torch.Tensor] = {}
        for path, layer in mix.layers.items():
            self._gates[path] = lora_scale * torch.eye(2, dtype=layer.A.dtype, device=layer.A.device)

    def embed(self, model, prompts: list[str], negative: list[str], guidance: bool) -> torch.Tensor:
        self.mix.off()  # the official pipelines load no LoRA into the text encoder
        return model.encode_prompts(prompts, negative, guidance)

    def noise(self, model, latents: torch.Tensor, t: torch.Tensor, step: int, embeds: Any) -> torch.Tensor:
        steps = len(model.scheduler.timesteps)
        self.total = int(self.sum_timesteps) if self.sum_timesteps else self.n_layers * steps
        if step == 0:
            self.trace = []
        self.step, self.calls = step, step * self.n_layers
        self.mix.gated(self._gate)
        try:
            pred = model.unet_noise(latents, t, embeds)
        finally:
            self.mix.off()
        if self.calls != (step + 1) * self.n_layers:
            raise RuntimeError(f"K-LoRA: {self.calls - step * self.n_layers} K-LoRA layer calls in one UNet call, "
                               f"expected each of the {self.n_layers} layers once")
        if self.info is not None and step == steps - 1:
            shares = [0] * steps
            for i, _, expert in self.trace:
                shares[i] += expert == 0
            self.info["subject_share_by_step"] = [round(s / self.n_layers, 4) for s in shares]
        return pred

    def select(self, path: str, call: int) -> int:
        """The expert (0 subject, 1 style) layer `path` applies at K-LoRA call `call` (1-based)."""
        s1, s2 = self.sums[path]
        return choose(s1, s2, self.gamma, time_scale(call, self.total, self.alpha, self.beta, self.pattern))

    def _gate(self, layer, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        expert = self.select(layer.path, self.calls)
        self.trace.append((self.step, layer.path, expert))
        return self._gates[layer.path][expert]


# --------------------------------------------------------------------- the method


@register_method("k_lora")
class KLora(Method):
    domains = ("vl",)

    def uses_seed(self) -> bool:
        return False  # weights-only selection, fixed pool order; sampling noise is the task's

    def _get(self, key: str, default):
        value = self.cfg.get(key, default) if self.cfg is not None else default
        return default if value is None and default is not None else value

    def check_config(self) -> None:
        for key, default in (("subject", 0), ("style", 1)):
            value = self._get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"method.{key}={value!r}: must be an expert index ≥ 0 within the composed set")
        if self._get("subject", 0) == self._get("style", 1):
            raise ConfigError(f"method.style={self._get('style', 1)!r}: must differ from method.subject")
        for key, choices, default in (("pattern", PATTERNS, "s*"), ("layers", LAYERS, "attention"),
                                      ("extra", EXTRA, "drop")):
            if self._get(key, default) not in choices:
                raise ConfigError(f"method.{key}={self._get(key, default)!r}; choose one of {choices}")
        alpha = self._number("alpha", 1.5)
        if not alpha > 0:
            raise ConfigError(f"method.alpha={alpha!r}: must be > 0")
        if self.cfg is not None and self.cfg.get("beta") is not None:
            self._number("beta", 0.0)
        self._number("lora_scale", 1.0)
        total = self._get("sum_timesteps", None)
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ConfigError(f"method.sum_timesteps={total!r}: must be null (layers × steps) or an integer ≥ 1")

    def _number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"method.{key}={value!r}: must be a finite number")
        return float(value)

    def settings(self) -> dict:
        pattern = str(self._get("pattern", "s*"))
        beta = self.cfg.get("beta") if self.cfg is not None else None
        return {"pattern": pattern, "alpha": self._number("alpha", 1.5),
                "beta": DEFAULT_BETA[pattern] if beta is None else float(beta),
                "sum_timesteps": self._get("sum_timesteps", None), "lora_scale": self._number("lora_scale", 1.0),
                "layers": str(self._get("layers", "attention"))}

    def pair(self, names: list[str]) -> tuple[int, int, list[str]]:
        """(subject index, style index, dropped expert names) for a composed set of `names`."""
        subject, style = int(self._get("subject", 0)), int(self._get("style", 1))
        if len(names) < 2:
            raise ConfigError(f"method.subject/method.style: K-LoRA fuses two LoRAs (subject, style); the set has "
                              f"{len(names)}: {names}")
        for key, index in (("subject", subject), ("style", style)):
            if index >= len(names):
                raise ConfigError(f"method.{key}={index}: the set has {len(names)} experts {names}")
        dropped = [n for i, n in enumerate(names) if i not in (subject, style)]
        if dropped and self._get("extra", "drop") == "error":
            raise ConfigError(f"method.extra=error: K-LoRA fuses two LoRAs (subject, style); the set has "
                              f"{len(names)}: {names} (method.extra=drop fuses method.subject and method.style only)")
        return subject, style, dropped

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") != "vl":
            raise ConfigError("method k_lora fuses diffusion LoRAs: it needs a vl task and a diffusion model")
        s = self.settings()
        i, j, dropped = self.pair(ctx.pool.names)
        subject, style = ctx.pool[i], ctx.pool[j]
        if dropped:
            log.warning("k_lora fuses %s (subject) and %s (style) only; dropped from the set: %s",
                        subject.name, style.name, dropped)
        with Timer() as timer:
            paths = klora_layers(subject, s["layers"])
            if not paths:
                raise AdapterError(f"K-LoRA: adapter {subject.name!r} adapts no UNet {s['layers']} layer "
                                   f"(method.layers={s['layers']})")
            sums, gamma, ks = layer_scores(subject, style, paths)
            fused = ExpertPool(ctx.pool.base_model, [
                LoraAdapter(a.name, a.base_model, {p: a.modules[p] for p in paths}, a.use_rslora, None)
                for a in (subject, style)])
        unused = len(subject.modules) - len(paths)
        info = {"subject": subject.name, "style": style.name, "dropped": dropped, **s,
                "gamma": gamma if math.isfinite(gamma) else str(gamma), "k_lora_layers": len(paths),
                "unused_layers": unused, "k": sorted(set(ks.values()))}
        with ctx.model.experts_applied(fused) as mix:
            hooks = KLoraHooks(mix, sums, gamma, s["alpha"], s["beta"], s["pattern"], s["sum_timesteps"],
                               s["lora_scale"], info)
            yield Composed(HookedModel(ctx.model, hooks), FitReport(seconds=timer.seconds, info=info))
