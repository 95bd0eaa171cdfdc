"""`method=cmlora`: Cached Multi-LoRA (CMLoRA; Zou, Shen, Bouganis, Zhao, ICLR 2025, arXiv 2502.04923), diffusion.

A LoRA Composite backbone (every expert's UNet prediction on the guidance batch ``[uncond; cond]``, combined, then
classifier-free guidance) in which one expert at a time is *dominant* (weighted up), the dominant expert follows a
frequency-ordered schedule, and the other experts' predictions are cached between refresh steps.

Read: the official code, Yqcca/CMLoRA at 5e79e417dd2c3794e14b379f088cd763fa548e3f (2025-06-14):
``fft_analysis.ipynb`` (the frequency score), ``compose_offline.py`` / ``example.py`` (defaults: 220 steps,
``lora_scale`` 1, ``cache_interval`` ∈ [0, 1, 2, 3, 5]) and ``LoRA_Cache/pipelines/stable_diffusion/
pipeline_offline.py`` (``StableDiffusionPipeline.__call__``, l. 1072-1213: weights, refresh steps, dominance,
caching; ``check_anime_lora``, l. 77-96: the high/low-frequency partition). Of the paper only the abstract was
readable offline (arXiv 2502.04923v1); its method section was not, so everything below follows the code.

1. Frequency score (``fft_analysis.ipynb``, cell 5; the same function is ``cal_mean_relative_log_amplitudes`` in
   ``pipeline_online.py``). Each expert alone (at ``lora_scale``, text encoder included) generates ``fft_images``
   images of ``fft_prompt``; per image (H×W×3, uint8): ``g = uint8(mean_RGB(image))``, ``A = log(|fftshift(fft2(g))|
   + 1e-8)``, radial bins ``r(y, x) = ⌊√((x − ⌊W/2⌋)² + (y − ⌊H/2⌋)²)⌋``, profile ``P(r) = mean of A over bin r``,
   ``P̂ = P / max_r P`` and score ``s = mean_{r ≥ k} P̂(r)`` with ``k = ⌊fft_cutoff · min(H, W)⌋`` (official: k = 72 on
   512² images: ``fft_cutoff`` = 72/512). An expert's score is the mean over its images.
2. Order and partition. Experts sorted by score, highest first (stable); the last ``A = min(n_low, N − 1)`` are the
   low-frequency experts, the first ``R = N − A`` the high-frequency ones (official ``check_anime_lora``: background
   LoRAs low, every other category high: ``adapters = real_list + abs_list``).
3. Refresh steps ``S`` of T steps (official ``interval_seq`` from ``cache_interval`` c): c = 0, the non-uniform
   sequence ``range(0, ⌊.375T⌋, 2) ∪ range(⌊.375T⌋, ⌊.875T⌋, 3) ∪ range(⌊.875T⌋, T, 2)``; c = 1, every step;
   c > 1, ``range(0, T, c)``.
4. Dominance (official ``indicator``): with ``k(i) = |{s ∈ S : s ≤ i}| − 1``, the dominant expert of step i is
   ``order[k(i) mod R]`` in the early stage and ``order[A + k(i) mod R]`` in the late stage ``i ≥ L``,
   ``L = ⌊late_start · T + ½⌋`` (official: ``i <= 120`` of the default 220 steps, so L = 121 = 0.55 · 220; the
   official late window is shifted by 1, i.e. by A for its single background LoRA). High-frequency experts dominate
   early, the low-frequency ones join the rotation late and the highest-frequency ones leave it.
5. Weights (official, l. 1072-1077): ``c_dom = dom_coeff`` (null: N − 0.5, the official hard-coded value),
   ``w_dom = c_dom / (c_dom + N − 1)`` for the dominant expert, ``w = 1 / (c_dom + N − 1)`` for the others (they sum
   to 1; the official code scales by N and takes the mean). Prediction ``ε = Σ_l w_l ε_l`` on ``[uncond; cond]``,
   then guidance (the sampler). ``dom_coeff: 1`` is LoRA Composite.
6. Caching (``cache: true``). At step i the dominant expert is always computed; the others are computed at refresh
   steps (``refresh: all``) or only at step 0 and while they are dominant (``refresh: dominant``: the official
   per-LoRA rule, a LoRA's cache is reset when it becomes dominant), and otherwise their last computed prediction
   is reused. ``cache: false``: every expert every step (the exact weighted composite).

Deviations (why):
- What is cached. Official: DeepCache-style feature caching inside a modified UNet (``quick_replicate``,
  ``cache_layer_id=0``, ``cache_block_id=1``): at cached steps every LoRA still runs the shallowest down/up blocks
  on the current latents and reuses only its deep features. Here the cached unit is an expert's whole UNet
  prediction (its contribution), so a cached expert costs no UNet call; the dominant expert is therefore computed at
  every step (official: it too reuses its features between refreshes; whole-prediction reuse would freeze the
  step). ``refresh: all`` (default) refreshes every expert at every refresh step, which keeps cached predictions at
  most one refresh interval old; ``refresh: dominant`` is the official reset rule, under which a never-dominant
  expert reuses its step-0 prediction.
- Official couplings made explicit: the official code caches only when ``cache_interval > 1``
  (``quick_replicate=cache_interval > 1``), so its non-uniform run (c = 0) does not cache; here ``cache`` is its own
  key (``cache: false`` with ``cache_interval: 0`` or 1 reproduces those runs).
- Official bugs not reproduced: the late-stage reset ``prv_features_list[1:][…] = None`` assigns into a copy (no
  late-stage refresh at all); ``dom_lora_coeff -= 0.5 ** indicator`` never reaches the weights (constant weights
  here too). The official partition is a hand-written category table (background = low); here it is computed from
  the score, with the count of low-frequency experts ``n_low`` (ComposLoRA compositions have at most one
  background). Within the high-frequency group the official order is the category order; here it is the score's.
- Score numerics: float64 throughout (official profile array float32); empty radial bins (only possible on tiny
  images) are left out of the max and the mean (official: NaN).
- The profiling prompt is ours (``fft_prompt`` with the expert's ``<token> <class>``; official: the ComposLoRA
  prompt with the LoRA's trigger words), as are its sampler settings (the task's steps and guidance by default).
- ``late_start`` and ``fft_cutoff`` are fractions (of T and of the image side) so that step counts and resolutions
  other than the official 220 / 512 scale.
- Text encoder (``text_encoder``): ``official`` (default) encodes the prompt once with every expert active at
  ``lora_scale`` (pipeline_offline: ``set_adapters(cur_loras)`` before the call, ``encode_prompt(lora_scale=…)``,
  l. 1002-1016), as LoRA Composite; ``per_expert`` as Composite's option.

The number of steps T is read from the scheduler (``len(model.scheduler.timesteps)``) at step 0 of each sampling run;
``report.info["compute"]`` counts expert UNet evaluations and steps over the composed model's generations.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from bench.errors import ConfigError
from bench.models.diffusion import PLAIN, HookedModel
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer

FORMS = ("batched", "serial")
TEXT_ENCODER = ("official", "per_expert")
REFRESH = ("all", "dominant")
ORDERS = ("frequency", "pool")
LOG_EPS = 1e-8  # fft_analysis.ipynb: np.log(magnitude_spectrum + 1e-8)
DEFAULTS = {"lora_scale": 1.0, "order": "frequency", "n_low": 1, "dom_coeff": None, "cache": True,
            "cache_interval": 0, "refresh": "all", "late_start": 0.55, "form": "batched", "text_encoder": "official",
            "fft_prompt": "a photo of {}", "fft_steps": 50, "fft_guidance": 7.5, "fft_seed": 0, "fft_images": 1,
            "fft_cutoff": 72 / 512}


# --------------------------------------------------------------------- frequency analysis


def grayscale(image) -> np.ndarray:
    """(H, W) float64 grey image as the notebook makes it: ``np.mean(rgb, axis=2).astype(np.uint8)``."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2).astype(np.uint8)
    if a.ndim != 2:
        raise ValueError(f"an image of shape {a.shape}: expected (H, W) or (H, W, C)")
    return a.astype(np.float64)


def radial_profile(gray: np.ndarray) -> np.ndarray:
    """Mean log amplitude of the centred 2-D spectrum per integer radius bin ⌊r⌋ (NaN for an empty bin)."""
    spectrum = np.fft.fftshift(np.fft.fft2(gray))
    log_amp = np.log(np.abs(spectrum) + LOG_EPS)
    rows, cols = gray.shape
    y = np.arange(rows) - rows // 2
    x = np.arange(cols) - cols // 2
    radius = np.sqrt(x[None, :] ** 2 + y[:, None] ** 2).astype(int).ravel()
    sums = np.bincount(radius, weights=log_amp.ravel())
    counts = np.bincount(radius)
    profile = np.full(len(counts), np.nan)
    profile[counts > 0] = sums[counts > 0] / counts[counts > 0]
    return profile


def frequency_score(image, cutoff: float = DEFAULTS["fft_cutoff"]) -> float:
    """Mean relative log amplitude over the radii ≥ ⌊cutoff · min(H, W)⌋ (higher: more high-frequency content)."""
    gray = grayscale(image)
    profile = radial_profile(gray)
    start = int(math.floor(cutoff * min(gray.shape)))
    tail = profile[start:]
    if not np.isfinite(tail).any():
        raise ConfigError(f"method.fft_cutoff={cutoff}: no frequency bin at radius ≥ {start} in a {gray.shape} image")
    return float(np.nanmean(tail / np.nanmax(profile)))


def frequency_order(scores: Sequence[float]) -> list[int]:
    """Expert indices by score, highest first; ties keep pool order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def n_low_frequency(n_experts: int, n_low: int) -> int:
    """How many experts are low-frequency: ``n_low``, leaving at least one high-frequency expert."""
    return max(0, min(int(n_low), n_experts - 1))


# --------------------------------------------------------------------- schedule


def refresh_steps(num_steps: int, cache_interval: int) -> list[int]:
    """The official ``interval_seq``: steps where the dominant expert advances and caches refresh."""
    T, c = int(num_steps), int(cache_interval)
    if c < 0:
        raise ConfigError(f"method.cache_interval={c}: must be ≥ 0 (0: the official non-uniform sequence)")
    if c == 0:
        a, b = int(0.375 * T), int(0.875 * T)
        steps = list(range(0, a, 2)) + list(range(a, b, 3)) + list(range(b, T, 2))
    else:
        steps = list(range(0, T, c))
    return sorted(steps)


def late_stage_start(num_steps: int, late_start: float) -> int:
    """L = late_start · T rounded half up (0.55 · 220 = 121, the official boundary)."""
    return int(math.floor(float(late_start) * int(num_steps) + 0.5))


def dominance_schedule(num_steps: int, n_high: int, n_low: int, refresh: Sequence[int],
                       late_start: float) -> list[int]:
    """Position (in the frequency order) of the dominant expert at each step: ``k mod R`` early, ``A + k mod R`` from
    step ``⌊late_start · T + ½⌋`` on, k = index of the latest refresh step."""
    if n_high < 1 or n_low < 0:
        raise ConfigError(f"dominance schedule needs ≥ 1 high-frequency expert (got {n_high} high, {n_low} low)")
    late, marks = late_stage_start(num_steps, late_start), set(refresh)
    k, out = -1, []
    for i in range(int(num_steps)):
        if i in marks:
            k += 1
        out.append((n_low if i >= late else 0) + k % n_high)
    return out


def dominance_weights(n_experts: int, dom_coeff: float | None = None) -> tuple[float, float]:
    """(weight of the dominant expert, weight of each other expert); they sum to 1 over the N experts."""
    coeff = n_experts - 0.5 if dom_coeff is None else float(dom_coeff)
    denom = coeff + n_experts - 1
    return coeff / denom, 1.0 / denom


def evaluation_plan(num_steps: int, dominant: Sequence[int], refresh: Sequence[int], n_experts: int,
                    cache: bool, policy: str = "all") -> list[list[int]]:
    """The experts whose UNet prediction is computed at each step (the rest reuse their cached prediction)."""
    if policy not in REFRESH:
        raise ConfigError(f"method.refresh={policy!r}; choose one of {REFRESH}")
    marks, everyone = set(refresh), list(range(n_experts))
    plan = []
    for i in range(int(num_steps)):
        if not cache or i == 0 or (policy == "all" and i in marks):
            plan.append(everyone)
        else:
            plan.append([dominant[i]])
    return plan


# --------------------------------------------------------------------- sampling hooks


class CMLoRAHooks:
    """Sampling hooks (see `bench.models.diffusion.SamplingHooks`): weighted composite of the experts' predictions
    with a scheduled dominant expert and cached non-dominant predictions.

    `order` is the frequency order (pool indices, highest first) and `n_low` the number of low-frequency experts at
    its end. Per sampling run (reset at step 0): `dominant` (pool index per step), `plan` (experts computed per step).
    """

    def __init__(self, mix, scale: float, order: Sequence[int], n_low: int, *, dom_coeff: float | None = None,
                 cache: bool = True, cache_interval: int = 0, refresh: str = "all", late_start: float = 0.55,
                 batched: bool = True, text_encoder: str = "official") -> None:
        if text_encoder not in TEXT_ENCODER:
            raise ConfigError(f"method.text_encoder={text_encoder!r}; choose one of {TEXT_ENCODER}")
        if refresh not in REFRESH:
            raise ConfigError(f"method.refresh={refresh!r}; choose one of {REFRESH}")
        if sorted(order) != list(range(mix.n)):
            raise ValueError(f"order {list(order)} is not a permutation of the {mix.n} experts")
        self.mix, self.scale, self.order = mix, float(scale), list(order)
        self.n_low = n_low_frequency(mix.n, n_low)
        self.w_dom, self.w_other = dominance_weights(mix.n, dom_coeff)
        self.cache, self.cache_interval, self.refresh = bool(cache), int(cache_interval), refresh
        self.late_start, self.batched, self.text_encoder = float(late_start), bool(batched), text_encoder
        self.stats = {"expert_evals": 0, "steps": 0}
        self.num_steps = 0
        self.dominant: list[int] = []
        self.plan: list[list[int]] = []
        self._cached: dict[int, torch.Tensor] = {}

    def schedule(self, num_steps: int) -> tuple[list[int], list[list[int]]]:
        """(dominant pool index per step, experts computed per step) for a run of `num_steps` steps."""
        refresh = refresh_steps(num_steps, self.cache_interval)
        positions = dominance_schedule(num_steps, self.mix.n - self.n_low, self.n_low, refresh, self.late_start)
        dominant = [self.order[p] for p in positions]
        return dominant, evaluation_plan(num_steps, dominant, refresh, self.mix.n, self.cache, self.refresh)

    def weights(self, step: int) -> list[float]:
        return [self.w_dom if i == self.dominant[step] else self.w_other for i in range(self.mix.n)]

    def embed(self, model, prompts: list[str], negative: list[str], guidance: bool) -> list[torch.Tensor]:
        mode = "all" if self.text_encoder == "official" else "per_expert"
        return model.expert_embeddings(self.mix, prompts, negative, guidance, self.scale, mode=mode)

    def predictions(self, model, latents: torch.Tensor, t: torch.Tensor, embeds: list[torch.Tensor],
                    experts: Sequence[int]) -> dict[int, torch.Tensor]:
        """Each listed expert's prediction (that expert alone at `scale`) on the guidance batch."""
        mix, n = self.mix, self.mix.n
        try:
            if not self.batched or len(experts) == 1:
                out = {}
                for i in experts:
                    mix.only(i, self.scale)
                    out[i] = model.unet_noise(latents, t, embeds[i])
                return out
            rows = latents.shape[0]
            owner = torch.tensor(list(experts), device=latents.device).repeat_interleave(rows)
            mix.weighted(self.scale * torch.nn.functional.one_hot(owner, n).to(latents.dtype))
            pred = model.unet_noise(latents.repeat(len(experts), *([1] * (latents.dim() - 1))), t,
                                    torch.cat([embeds[i] for i in experts]))
            return dict(zip(experts, pred.view(len(experts), rows, *pred.shape[1:]).unbind(0)))
        finally:
            mix.off()

    def noise(self, model, latents: torch.Tensor, t: torch.Tensor, step: int, embeds: list[Any]) -> torch.Tensor:
        if step == 0:
            self.num_steps = len(model.scheduler.timesteps)
            self.dominant, self.plan = self.schedule(self.num_steps)
            self._cached = {}
        if step >= self.num_steps:
            raise RuntimeError(f"step {step} of a {self.num_steps}-step run")
        fresh = self.plan[step]
        self._cached.update(self.predictions(model, latents, t, embeds, fresh))
        self.stats["expert_evals"] += len(fresh)
        self.stats["steps"] += 1
        weights = self.weights(step)
        total = None
        for i in range(self.mix.n):
            term = weights[i] * self._cached[i]
            total = term if total is None else total + term
        return total


# --------------------------------------------------------------------- the method


def expert_phrase(adapter) -> str:
    """``<token> <class>`` of a subject LoRA (bench.experts.vl metadata), else its name with spaces."""
    meta = getattr(adapter, "metadata", None) or {}
    if meta.get("token") and meta.get("class"):
        return f"{meta['token']} {meta['class']}"
    return str(adapter.name).replace("_", " ")


def profile_scores(model, mix, pool, scale: float, prompt: str, steps: int, guidance: float, seed: int,
                   n_images: int, cutoff: float) -> list[float]:
    """Each expert's frequency score: the mean over `n_images` images it generates alone (text encoder too)."""
    scores = []
    for i, adapter in enumerate(pool):
        mix.only(i, scale)
        try:
            images = model.generate([prompt.format(expert_phrase(adapter))], n_images=n_images, seed=seed,
                                    num_inference_steps=steps, guidance_scale=guidance, negative_prompt="",
                                    hooks=PLAIN)
        finally:
            mix.off()
        scores.append(float(np.mean([frequency_score(np.asarray(im.convert("RGB")), cutoff) for im in images])))
    return scores


@register_method("cmlora")
class CMLoRA(Method):
    domains = ("vl",)

    def opt(self, key: str):
        value = self.cfg.get(key, DEFAULTS[key]) if self.cfg is not None else DEFAULTS[key]
        return DEFAULTS[key] if value is None and DEFAULTS[key] is not None else value

    def uses_seed(self) -> bool:
        return self.cfg.get("n") is not None  # fixed profiling noise (fft_seed), pool order, fixed-noise sampling

    def check_config(self) -> None:
        def number(key, kind=float):
            try:
                return kind(self.opt(key))
            except (TypeError, ValueError):
                raise ConfigError(f"method.{key}={self.opt(key)!r}: expected a {kind.__name__}") from None

        choices = {"order": ORDERS, "refresh": REFRESH, "form": FORMS, "text_encoder": TEXT_ENCODER}
        for key, allowed in choices.items():
            if self.opt(key) not in allowed:
                raise ConfigError(f"method.{key}={self.opt(key)!r}; choose one of {allowed}")
        if not isinstance(self.opt("cache"), bool):
            raise ConfigError(f"method.cache={self.opt('cache')!r}: expected true or false")
        if number("cache_interval", int) < 0:
            raise ConfigError(f"method.cache_interval={self.opt('cache_interval')}: must be ≥ 0 "
                              "(0: the official non-uniform sequence, 1: every step, c: every c steps)")
        if number("n_low", int) < 0:
            raise ConfigError(f"method.n_low={self.opt('n_low')}: must be ≥ 0")
        if self.opt("dom_coeff") is not None and not number("dom_coeff") > 0:
            raise ConfigError(f"method.dom_coeff={self.opt('dom_coeff')}: must be > 0 (null: N - 0.5)")
        if not 0.0 <= number("late_start") <= 1.0:
            raise ConfigError(f"method.late_start={self.opt('late_start')}: a fraction of the steps in [0, 1]")
        if not number("lora_scale") > 0:
            raise ConfigError(f"method.lora_scale={self.opt('lora_scale')}: must be > 0")
        if not 0.0 <= number("fft_cutoff") < 0.5:
            raise ConfigError(f"method.fft_cutoff={self.opt('fft_cutoff')}: a fraction of the image side in [0, 0.5)")
        for key in ("fft_steps", "fft_images"):
            if number(key, int) < 1:
                raise ConfigError(f"method.{key}={self.opt(key)}: must be ≥ 1")
        number("fft_seed", int)
        number("fft_guidance")
        if "{}" not in str(self.opt("fft_prompt")):
            raise ConfigError(f"method.fft_prompt={self.opt('fft_prompt')!r}: must contain {{}} (the expert's phrase)")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") != "vl":
            raise ConfigError("method=cmlora composes diffusion LoRAs only (a task of the vl domain)")
        scale = float(self.opt("lora_scale"))
        with ctx.model.experts_applied(ctx.pool) as mix:
            names = ctx.pool.names
            with Timer() as timer:
                if self.opt("order") == "frequency":
                    scores = profile_scores(ctx.model, mix, ctx.pool, scale, str(self.opt("fft_prompt")),
                                            int(self.opt("fft_steps")), float(self.opt("fft_guidance")),
                                            int(self.opt("fft_seed")), int(self.opt("fft_images")),
                                            float(self.opt("fft_cutoff")))
                    order = frequency_order(scores)
                else:
                    scores, order = None, list(range(len(names)))
            hooks = CMLoRAHooks(mix, scale, order, int(self.opt("n_low")), dom_coeff=self.opt("dom_coeff"),
                                cache=bool(self.opt("cache")), cache_interval=int(self.opt("cache_interval")),
                                refresh=str(self.opt("refresh")), late_start=float(self.opt("late_start")),
                                batched=self.opt("form") == "batched", text_encoder=str(self.opt("text_encoder")))
            ordered = [names[i] for i in order]
            info = {
                "order": ordered,
                "frequency_scores": None if scores is None else {names[i]: scores[i] for i in order},
                "high_frequency": ordered[: len(names) - hooks.n_low],
                "low_frequency": ordered[len(names) - hooks.n_low:],
                "weights": {"dominant": hooks.w_dom, "other": hooks.w_other}, "lora_scale": scale,
                "cache": hooks.cache, "cache_interval": hooks.cache_interval, "refresh": hooks.refresh,
                "late_start": hooks.late_start, "form": self.opt("form"), "text_encoder": hooks.text_encoder,
                "compute": hooks.stats,  # filled in while the task samples: expert UNet evaluations, steps
            }
            report = FitReport(seconds=timer.seconds, info=info)
            yield Composed(HookedModel(ctx.model, hooks), report)
