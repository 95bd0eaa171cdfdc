"""`DiffusionModel`: a Stable Diffusion pipeline (diffusers) and the operations the V&L methods and tasks need.

Sources (`conf/model/*.yaml`, ``kind: diffusion``): ``hub`` (a hub id, e.g. SD 1.5), ``local`` (a folder written by
``save_pretrained``) and ``tiny`` (UNet, VAE and CLIP text encoder built from ``arch`` with seeded random weights and
a real CLIP BPE tokenizer made from the vocabulary open_clip bundles; built once and saved under
``<cache_dir>/models/<name>``, then always reloaded from there, so LoRAs trained on it stay valid).

Module paths. One `LoraAdapter` can target the UNet and the text encoder: its module paths are prefixed with the
component, exactly as in diffusers LoRA files (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``). `DiffusionModel.components` is the
``ModuleDict({"unet", "text_encoder"})`` whose ``named_modules()`` yields these paths.

Sampling is our own loop (`sample`), step for step the loop of ``StableDiffusionPipeline.__call__`` (tested equal),
with two hooks a composition method may override (`SamplingHooks`): how prompts are embedded and how the noise
prediction of step i is made. The hooks run *before* step i's model call, so there is no step-end off-by-one.

LoRAs are applied three ways, each restoring the exact base modules on exit: `adapter_applied` (one adapter injected
through peft: static methods), `deltas_folded` (``W += ΔW``) and `experts_applied` (all experts of a pool stacked in
one `bench.lora.stacked.StackedLoraLinear` per layer, the layers' mode set through one `ExpertMix`: per-step / per-row /
gated weights for Switch, Composite, MoLE).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from bench.errors import AdapterError, ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, stacked_experts
from bench.models.lm import folded
from bench.progress import BARS_OFF

SOURCES = ("hub", "local", "tiny")
SCHEDULERS = ("dpmsolver++", "ddim", "euler", "pndm")
COMPONENTS = ("unet", "text_encoder")
# How `DiffusionModel.expert_embeddings` runs the text encoder for LoRA Switch / Composite.
EMBED_MODES = ("per_expert", "first", "all")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_PEFT_ADAPTER = "bench"


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r}; choose one of {sorted(_DTYPES)}") from None


# --------------------------------------------------------------------- loading


def load_diffusion_model(cfg, cache_dir: str | Path, device: str = "auto") -> "DiffusionModel":
    """The Stable Diffusion pipeline named by a ``kind: diffusion`` model config, on `device`, weights frozen."""
    from diffusers import StableDiffusionPipeline

    from bench.models.loading import resolve_device

    if cfg.get("kind") != "diffusion":
        raise ConfigError(f"model {cfg.get('name')!r}: kind={cfg.get('kind')!r}, expected 'diffusion'")
    if cfg.source not in SOURCES:
        raise ConfigError(f"model.source={cfg.source!r}; choose one of {SOURCES}")
    dtype = resolve_dtype(str(cfg.get("dtype", "float32")))
    kwargs = dict(dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if cfg.source == "hub":
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(cfg.id), revision=cfg.get("revision"), variant=cfg.get("variant"),
                cache_dir=str(Path(cache_dir) / "hub"), use_safetensors=True, **kwargs,
            )
        except Exception as exc:  # offline, missing repo, gated model
            raise ConfigError(f"model {cfg.id!r}: cannot load from the hub ({type(exc).__name__}: {exc})") from exc
    else:
        folder = Path(cfg.path).expanduser() if cfg.source == "local" else _materialize_tiny(cfg, Path(cache_dir))
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"model.path={str(folder)!r} is not a diffusers pipeline folder (no model_index.json)")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)
    pipe.scheduler = make_scheduler(str(cfg.get("scheduler", "dpmsolver++")), pipe.scheduler.config)
    pipe.to(resolve_device(device))
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    resolution = int(cfg.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return DiffusionModel(pipe=pipe, model_id=str(cfg.id), name=str(cfg.name), resolution=resolution)


def make_scheduler(name: str, config):
    """A sampler from the pipeline's scheduler config: `dpmsolver++` (the multi-LoRA papers' default), ddim, ..."""
    import diffusers

    if name == "dpmsolver++":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}
    if name not in classes:
        raise ConfigError(f"model.scheduler={name!r}; choose one of {SCHEDULERS}")
    return getattr(diffusers, classes[name]).from_config(config)


def _materialize_tiny(cfg, cache_dir: Path) -> Path:
    """Build the tiny pipeline once (seeded) and save it; later calls reuse the saved folder."""
    folder = cache_dir / "models" / str(cfg.name)
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    build_tiny_pipeline(cfg).save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(folder)
    return folder


def build_tiny_pipeline(cfg):
    """A StableDiffusionPipeline with random weights from ``cfg.arch`` (unet, vae, text_encoder) and the CLIP BPE."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    tokenizer = clip_bpe_tokenizer()
    torch.manual_seed(int(cfg.get("seed", 0)))
    unet = UNet2DConditionModel(**arch["unet"])
    vae = AutoencoderKL(**arch["vae"])
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length, **arch["text_encoder"],
    )
    text_encoder = CLIPTextModel(text_config)
    # The SD 1.x training schedule (what a DPM-Solver++ sampler is configured from).
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def clip_bpe_tokenizer(model_max_length: int = 77):
    """The CLIP tokenizer (transformers) built offline from open_clip's bundled BPE merges.

    Same vocabulary recipe as open_clip's SimpleTokenizer (bytes, bytes + ``</w>``, merges), with the special tokens
    named ``<|startoftext|>`` / ``<|endoftext|>`` (ids 49406 / 49407), as in the SD 1.x ``tokenizer/`` folder.
    """
    import tempfile

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


# --------------------------------------------------------------------- sampling hooks


class SamplingHooks:
    """How a composition method changes sampling. The defaults are the plain pipeline.

    `embed` returns whatever `noise` needs as text conditioning (the default: one tensor, ``[uncond; cond]`` under
    classifier-free guidance); `noise` returns the noise prediction for the guidance batch at step `step`.
    """

    def embed(self, model: "DiffusionModel", prompts: list[str], negative: list[str], guidance: bool) -> Any:
        return model.encode_prompts(prompts, negative, guidance)

    def noise(self, model: "DiffusionModel", latents: torch.Tensor, t: torch.Tensor, step: int,
              embeds: Any) -> torch.Tensor:
        return model.unet_noise(latents, t, embeds)


PLAIN = SamplingHooks()


# --------------------------------------------------------------------- stacked experts

MixGate = Callable[[StackedLoraLinear, torch.Tensor], torch.Tensor]  # (layer, rank activations h) -> (batch, N)


class ExpertMix:
    """The mode shared by all `StackedLoraLinear` layers of one model (each layer's `mix`): which experts act, with
    which weights. The layers' math is `bench.lora.stacked`'s; this picks, per forward, which of it runs.

    Exactly one mode at a time: `only(i)` (expert i alone, computed on its own rank slice), `weighted(w)` with
    ``w`` of shape (N,) (every row) or (batch, N) (one weight vector per batch row), or a `gate` callable
    ``gate(layer, h) -> (batch, N)`` (learned gates; ``h`` the layer's rank activations); `off()` runs the base model.
    """

    single: int | None
    single_scale: float = 1.0
    weights: torch.Tensor | None
    gate: MixGate | None

    def __init__(self, names: Sequence[str], layers: dict[str, StackedLoraLinear]) -> None:
        self.names, self.layers = list(names), layers
        self.off()
        for layer in layers.values():
            layer.mix = self

    @property
    def n(self) -> int:
        return len(self.names)

    def only(self, index: int, scale: float = 1.0) -> None:
        if not 0 <= index < self.n:
            raise IndexError(f"expert {index} of {self.n}")
        self.off()
        self.single, self.single_scale = index, float(scale)

    def weighted(self, weights: torch.Tensor) -> None:
        if weights.shape[-1] != self.n or weights.dim() not in (1, 2):
            raise ValueError(f"weights of shape {tuple(weights.shape)} for {self.n} experts")
        self.off()
        self.weights = weights

    def gated(self, gate: MixGate) -> None:
        self.off()
        self.gate = gate

    def off(self) -> None:
        self.single, self.weights, self.gate = None, None, None

    def __call__(self, layer: StackedLoraLinear, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output under the current mode (the layer's `mix` hook)."""
        if self.single is not None:
            return layer.base(x) + layer.single_delta(x, self.single, self.single_scale)
        if self.weights is None and self.gate is None:
            return layer.base(x)
        h = layer.project(x)
        return layer.gated_forward(x, h, self.gate(layer, h) if self.gate is not None else self.weights)


# --------------------------------------------------------------------- the model


@dataclass
class DiffusionModel:
    pipe: Any  # diffusers.StableDiffusionPipeline
    model_id: str
    name: str
    resolution: int
    domain: ClassVar[str] = "vl"
    components: torch.nn.ModuleDict = field(init=False, repr=False)
    _peft_layers: dict[str, torch.nn.Module] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.components = torch.nn.ModuleDict({"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder})

    # ----------------------------------------------------------------- components
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.unet.config.in_channels, side, side)

    # ----------------------------------------------------------------- building blocks of sampling
    def encode_prompts(self, prompts: Sequence[str], negative: Sequence[str], guidance: bool) -> torch.Tensor:
        """Text conditioning: ``[uncond; cond]`` (2B, L, D) under guidance, else ``cond`` (B, L, D)."""
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, guidance, negative_prompt=list(negative))
        return torch.cat([uncond, cond]) if guidance else cond

    def unet_noise(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def initial_noise(self, n_images: int, seed: int) -> torch.Tensor:
        """(n_images, C, h, w) standard normal, drawn on the CPU from ``Generator(seed)``: image j of every prompt
        gets the j-th draw, whatever the device, batch size or method."""
        gen = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randn((n_images, *self.latent_shape), generator=gen, dtype=torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W); differentiable."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1)

    def sample(self, noise: torch.Tensor, embeds: Any, num_inference_steps: int, guidance_scale: float,
               hooks: SamplingHooks = PLAIN, grad_steps: int = 0) -> torch.Tensor:
        """The denoising loop of StableDiffusionPipeline (CFG when guidance_scale > 1); returns the final latents.

        `grad_steps` > 0 keeps the autograd graph of the last `grad_steps` steps only (truncated backpropagation,
        for gates trained through sampling); other steps run without gradients.
        """
        scheduler = self.scheduler
        scheduler.set_timesteps(int(num_inference_steps), device=self.device)
        guidance = guidance_scale > 1.0
        latents = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma
        extra = self.pipe.prepare_extra_step_kwargs(None, 0.0)
        steps = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(grad_steps > 0 and i >= steps - grad_steps):
                inputs = torch.cat([latents] * 2) if guidance else latents
                inputs = scheduler.scale_model_input(inputs, t)
                pred = hooks.noise(self, inputs, t, i, embeds)
                if guidance:
                    uncond, cond = pred.chunk(2)
                    pred = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n_images: int = 1, seed: int = 0, num_inference_steps: int = 30,
                 guidance_scale: float = 7.5, negative_prompt: str = "", hooks: SamplingHooks | None = None,
                 batch_size: int = 8, progress: bool = False, desc: str = "generate") -> list:
        """`n_images` PIL images per prompt, prompt-major (prompt 0's images first)."""
        hooks = hooks or PLAIN
        noise = self.initial_noise(n_images, seed)
        jobs = [(p, j) for p in prompts for j in range(n_images)]
        images = []
        chunks = range(0, len(jobs), batch_size)
        for start in tqdm(chunks, desc=desc, disable=not progress or BARS_OFF, leave=False):
            chunk = jobs[start : start + batch_size]
            texts = [p for p, _ in chunk]
            embeds = hooks.embed(self, texts, [negative_prompt] * len(texts), guidance_scale > 1.0)
            latents = self.sample(torch.stack([noise[j] for _, j in chunk]), embeds, num_inference_steps,
                                  guidance_scale, hooks)
            images.extend(self.to_pil(self.decode(latents)))
        return images

    def to_pil(self, images: torch.Tensor) -> list:
        """(B, 3, H, W) in [0, 1] -> PIL images (the pipeline's postprocessing)."""
        return self.pipe.image_processor.postprocess(images * 2 - 1, output_type="pil")

    # ----------------------------------------------------------------- applying adapters
    def check_adapter(self, adapter: LoraAdapter) -> None:
        """`adapter` was trained on this model (when it says), and every module it targets is a linear layer of this
        model (under its component prefix) of the adapter's shape."""
        ExpertPool(self.model_id, [adapter]).check_model(self.components)
        bad = sorted({m.split(".", 1)[0] for m in adapter.modules} - set(COMPONENTS))
        if bad:
            raise AdapterError(f"adapter {adapter.name!r}: module paths must start with one of {COMPONENTS}, got {bad}")

    @contextlib.contextmanager
    def adapter_applied(self, adapter: LoraAdapter, trainable: bool = False) -> Iterator["DiffusionModel"]:
        """Run the block with `adapter` injected through peft (UNet and/or text encoder); the original linear modules
        are put back afterwards. `trainable=True` leaves the LoRA factors trainable (`lora_parameters`)."""
        from peft import LoraConfig, inject_adapter_in_model

        self.check_adapter(adapter)
        if self._peft_layers:
            raise RuntimeError("an adapter is already applied to this model")
        rank = max(adapter.ranks)
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(adapter.modules),
                            rank_pattern={re.escape(k): m.rank for k, m in adapter.modules.items() if m.rank != rank})
        inject_adapter_in_model(config, self.components, adapter_name=_PEFT_ADAPTER)
        layers = {name: self.components.get_submodule(name) for name in adapter.modules}
        try:
            with torch.no_grad():
                for name, layer in layers.items():
                    m, w = adapter.modules[name], layer.get_base_layer().weight
                    layer.lora_A[_PEFT_ADAPTER].weight.copy_(m.A.to(w.device, w.dtype))
                    layer.lora_B[_PEFT_ADAPTER].weight.copy_(m.B.to(w.device, w.dtype))
                    layer.scaling[_PEFT_ADAPTER] = m.scale
                    for p in (layer.lora_A[_PEFT_ADAPTER].weight, layer.lora_B[_PEFT_ADAPTER].weight):
                        p.requires_grad_(trainable)
            self._peft_layers = layers
            yield self
        finally:
            self._peft_layers = {}
            _unwrap_peft(self.components)
            vars(self.components).pop("peft_config", None)  # left by peft's injection

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The A and B factors of the adapter applied by `adapter_applied`."""
        return [p for layer in self._peft_layers.values()
                for p in (layer.lora_A[_PEFT_ADAPTER].weight, layer.lora_B[_PEFT_ADAPTER].weight)]

    def applied_adapter(self, name: str, base: LoraAdapter) -> LoraAdapter:
        """The current factors of the applied adapter (after training) as a LoraAdapter shaped like `base`."""
        modules = {
            k: LoraModule(layer.lora_A[_PEFT_ADAPTER].weight.detach().float().cpu().clone(),
                          layer.lora_B[_PEFT_ADAPTER].weight.detach().float().cpu().clone(), base.modules[k].scale)
            for k, layer in self._peft_layers.items()
        }
        return LoraAdapter(name, base.base_model, modules, use_rslora=base.use_rslora, task_type=None)

    @contextlib.contextmanager
    def deltas_folded(self, deltas: dict[str, torch.Tensor]) -> Iterator["DiffusionModel"]:
        """Run the block with ``W += ΔW`` for each named linear layer; original weights restored bit-exactly."""
        with folded(self.components, deltas):
            yield self

    @contextlib.contextmanager
    def experts_applied(self, pool: ExpertPool) -> Iterator[ExpertMix]:
        """Run the block with every expert of `pool` stacked into `StackedLoraLinear` layers, controlled through the
        yielded `ExpertMix` (initially off); the original linear modules are put back afterwards."""
        for adapter in pool:
            self.check_adapter(adapter)
        with stack_experts(self.components, pool) as mix:
            yield mix

    def expert_embeddings(self, mix: ExpertMix, prompts: Sequence[str], negative: Sequence[str], guidance: bool,
                          scale: float = 1.0, mode: str = "per_expert") -> list[torch.Tensor]:
        """Text conditioning for each of the `mix.n` experts (a list of N tensors, as `composite_noise` and the
        Switch hooks read it), under one of the `EMBED_MODES`:

        ``per_expert``: N encodings, expert i alone in the text encoder at `scale`;
        ``first``: one encoding with expert 0 alone at `scale`, shared by every expert (the official LoRA Switch:
        the prompt is encoded once with the adapter set active before the pipeline call);
        ``all``: one encoding with every expert active at once, each at `scale` (``W + Σ_i scale·s_i B_i A_i``),
        shared by every expert (the official LoRA Composite: ``set_adapters(all)`` at weight 1, then
        ``encode_prompt(lora_scale=scale)``).

        When the experts do not touch the text encoder, every mode is the plain encoding, shared. The mix is left
        off.
        """
        if mode not in EMBED_MODES:
            raise ConfigError(f"text-encoder embedding mode {mode!r}; choose one of {EMBED_MODES}")
        if not any(path.startswith("text_encoder.") for path in mix.layers):
            mix.off()
            return [self.encode_prompts(prompts, negative, guidance)] * mix.n
        try:
            if mode == "per_expert":
                embeds = []
                for i in range(mix.n):
                    mix.only(i, scale)
                    embeds.append(self.encode_prompts(prompts, negative, guidance))
                return embeds
            if mode == "first":
                mix.only(0, scale)
            else:
                mix.weighted(torch.full((mix.n,), float(scale), dtype=self.text_encoder.dtype,
                                        device=self.text_encoder.device))
            return [self.encode_prompts(prompts, negative, guidance)] * mix.n
        finally:
            mix.off()


@dataclass
class HookedModel:
    """A composed V&L model: `model` sampled with a method's hooks; same `generate` signature as DiffusionModel."""

    model: DiffusionModel
    hooks: SamplingHooks

    def generate(self, prompts: Sequence[str], **kwargs) -> list:
        return self.model.generate(prompts, hooks=self.hooks, **kwargs)


@contextlib.contextmanager
def stack_experts(root: torch.nn.Module, pool: ExpertPool) -> Iterator[ExpertMix]:
    """Replace every module of `pool` under `root` by a `StackedLoraLinear` of all experts, driven by the yielded
    `ExpertMix` (initially off); restore on exit."""
    with stacked_experts(root, pool) as layers:
        mix = ExpertMix(pool.names, layers)
        try:
            yield mix
        finally:
            mix.off()


def composite_noise(unet: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], mix: ExpertMix,
                    latents: torch.Tensor, t: torch.Tensor, embeds: list[torch.Tensor], scale: float,
                    batched: bool) -> torch.Tensor:
    """LoRA Composite's prediction: the mean over experts of the prediction with expert i alone (at `scale`) on the
    guidance batch; `embeds[i]` is expert i's conditioning. Batched: one call on batch N·rows, expert i on rows
    i·rows … (i+1)·rows − 1; serial: N calls."""
    n = mix.n
    if not batched:
        total = None
        for i in range(n):
            mix.only(i, scale)
            pred = unet(latents, t, embeds[i])
            total = pred if total is None else total + pred
        mix.off()
        return total / n
    rows = latents.shape[0]
    owner = torch.arange(n, device=latents.device).repeat_interleave(rows)
    mix.weighted(scale * torch.nn.functional.one_hot(owner, n).to(latents.dtype))
    pred = unet(latents.repeat(n, *([1] * (latents.dim() - 1))), t, torch.cat(embeds))
    mix.off()
    return pred.view(n, rows, *pred.shape[1:]).mean(0)


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _unwrap_peft(root: torch.nn.Module) -> None:
    """Replace every peft LoRA layer under `root` by the base layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, m in root.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in wrapped:
        _set_submodule(root, name, root.get_submodule(name).get_base_layer())
