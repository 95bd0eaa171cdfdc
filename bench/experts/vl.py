"""DreamBooth subject LoRAs: train one per subject (``make experts`` for ``domain: vl`` pools) and load them as a pool.

Training (our own small loop after diffusers' ``train_dreambooth_lora.py``): the subject's photos, resized and
center-cropped to ``resolution``, are encoded once by the VAE; each step draws latents from their posterior, adds
noise at uniform random timesteps (DDPM schedule of the model) and regresses the noise (or the velocity for
v-prediction models) with the UNet conditioned on ``a photo of <token> <class>``. LoRA factors (rank ``rank``,
``alpha``, on ``targets`` of the UNet and ``text_encoder_targets`` of the text encoder; A Gaussian, B zero) train
with AdamW in float32. Prior preservation (optional): ``num_class_images`` images of ``a photo of <class>`` from the
base model (cached under ``<dir>/_class_images/``) join every batch, weighted by ``prior_loss_weight``.

Each subject is saved as a diffusers LoRA folder ``<dir>/<subject>/`` (``pytorch_lora_weights.safetensors``, loadable
by ``pipe.load_lora_weights``; `LoraAdapter.load` reads it, validated), and ``<dir>/manifest.json`` records the
config, base model (id and weight fingerprint), command and, per subject, token, class, data hash, final loss and
seconds. Subjects trained with the same config on the same base weights are kept; otherwise they are retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bench.errors import ConfigError, DataError
from bench.experts.manifest import train_if_stale
from bench.files import write_json_atomic
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.diffusers_lora import WEIGHTS_NAME, save_diffusers_lora
from bench.lora.load import load_adapter
from bench.lora.pool import ExpertPool

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def subject_names(experts_cfg, data) -> list[str]:
    """The pool's subjects in order: ``experts.subjects``, or every subject of the data when null."""
    return [str(s) for s in experts_cfg.subjects] if experts_cfg.get("subjects") else sorted(data.subjects)


def pool_problem(experts_cfg, model, data) -> str | None:
    """Why the trained pool in ``experts.dir`` cannot be used as is (None when it is complete and current)."""
    from bench.experts.manifest import manifest_problem

    problem = manifest_problem(experts_cfg, model.components)
    if problem:
        return problem
    folder = Path(experts_cfg.dir)
    missing = [s for s in subject_names(experts_cfg, data) if not (folder / s / WEIGHTS_NAME).is_file()]
    return f"subjects missing: {missing}" if missing else None


def train_subject_pool(experts_cfg, model, data_root: str | None, out_dir: Path) -> None:
    """Train one LoRA per subject of the experts config for `model` into `out_dir`. Subjects already trained
    with the same config on the same base weights are kept; a changed config or base retrains them all."""
    from bench.models.loading import fingerprint
    from tasks.dreambooth import unique_token

    train = experts_cfg.train
    data = _data(train, data_root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    current = {"pool": str(experts_cfg.name), "base_model": model.model_id,
               "base_fingerprint": fingerprint(model.components), "train": OmegaConf.to_container(train, resolve=True)}
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if any(manifest.get(k) != v for k, v in current.items()):
        manifest = {**current, "subjects": {}}
    for name in tqdm(subject_names(experts_cfg, data), desc=f"experts {experts_cfg.name}"):
        subject = data.subject(name)
        token = unique_token(name, train.get("tokens"))
        if name in manifest["subjects"] and (out_dir / name / WEIGHTS_NAME).is_file():
            log.info("expert %s is current in %s; kept", name, out_dir)
            continue
        start = time.perf_counter()
        class_images = class_prior_images(model, subject.cls, train, out_dir) if train.get("prior_preservation") else []
        adapter, loss = train_subject(model, name, subject.images, f"{token} {subject.cls}", train, class_images,
                                      f"a photo of {subject.cls}" if class_images else None)
        info = {"token": token, "class": subject.cls, "images": len(subject.images),
                "data_hash": _hash_files(subject.images), "final_loss": round(loss, 5),
                "seconds": round(time.perf_counter() - start, 2)}
        adapter.metadata = {"pool": str(experts_cfg.name), **info}
        save_diffusers_lora(adapter, out_dir / name)
        manifest["subjects"][name] = info
        write_json_atomic(manifest_path, {**manifest, "command": " ".join(sys.argv),
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def load_subject_pool(experts_cfg, model, data_root: str | None, train_if_missing: bool = True) -> ExpertPool:
    """The subject LoRAs of an experts config (``domain: vl``) from ``experts.dir``, trained first when missing or
    stale (if allowed), each validated against `model` (base model id, module names, shapes)."""
    data = _data(experts_cfg.train, data_root)
    folder = Path(experts_cfg.dir)
    train_if_stale(experts_cfg, folder, lambda: pool_problem(experts_cfg, model, data),
                   lambda: train_subject_pool(experts_cfg, model, data_root, folder), train_if_missing)
    pool = ExpertPool(model.model_id, [load_adapter(folder / s) for s in subject_names(experts_cfg, data)])
    for adapter in pool:
        model.check_adapter(adapter)
    return pool


def _data(train, data_root: str | None):
    from tasks.dreambooth import load_dreambooth

    if not data_root:
        raise DataError("DreamBooth experts need paths.data_root (the folder holding dreambooth/)")
    return load_dreambooth(str(Path(data_root) / str(train.get("data_subdir", "dreambooth"))))


def init_adapter(model, name: str, rank: int, alpha: float, targets, text_encoder_targets,
                 generator: torch.Generator) -> LoraAdapter:
    """A fresh LoRA for the targeted linear layers: A ~ N(0, 1/r²) (peft's "gaussian"), B = 0."""
    leaves = {"unet": list(targets or []), "text_encoder": list(text_encoder_targets or [])}
    modules = {}
    for path, layer in model.components.named_modules():
        component, _, rest = path.partition(".")
        # peft's rule: a target names the module path or its last components (``to_q``, ``to_out.0``)
        if isinstance(layer, torch.nn.Linear) and any(rest == t or rest.endswith(f".{t}") for t in leaves[component]):
            A = torch.randn(rank, layer.in_features, generator=generator) / rank
            modules[path] = LoraModule(A, torch.zeros(layer.out_features, rank), alpha / rank)
    if not modules:
        raise ConfigError(f"expert {name!r}: targets {sorted(leaves['unet'])} / {sorted(leaves['text_encoder'])} "
                          "match no linear layer of the model")
    return LoraAdapter(name, model.model_id, modules, task_type=None)


def train_subject(model, name: str, images, phrase: str, train, class_images=(), class_prompt: str | None = None
                  ) -> tuple[LoraAdapter, float]:
    """One DreamBooth LoRA; returns it and the mean loss of the last 10 steps."""
    from diffusers import DDPMScheduler

    seed = int(train.get("seed", 0))
    gen = torch.Generator("cpu").manual_seed(seed)
    rank, steps, batch = int(train.rank), int(train.steps), int(train.get("batch_size", 1))
    init = init_adapter(model, name, rank, float(train.get("alpha", rank)), train.get("targets"),
                        train.get("text_encoder_targets"), gen)
    resolution = int(train.get("resolution") or model.resolution)
    instance = _latent_posterior(model, load_pixels(images, resolution))
    prior = _latent_posterior(model, load_pixels(class_images, resolution)) if class_images else None
    noise_scheduler = DDPMScheduler.from_config(model.scheduler.config)
    prompt = str(train.get("instance_prompt", "a photo of {}")).format(phrase)
    train_te = bool(train.get("text_encoder_targets"))
    prior_weight = float(train.get("prior_loss_weight", 1.0))
    losses = []
    with model.adapter_applied(init, trainable=True):
        params = model.lora_parameters()
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=float(train.lr), weight_decay=float(train.get("weight_decay", 1e-2)))
        with torch.set_grad_enabled(train_te):
            texts = [prompt] * batch + ([class_prompt] * batch if prior is not None else [])
            fixed_embeds = None if train_te else model.encode_prompts(texts, [""] * len(texts), False)
        for _ in tqdm(range(steps), desc=f"dreambooth {name}", leave=False):
            with torch.enable_grad():
                latents = _draw(instance, batch, gen)
                if prior is not None:
                    latents = torch.cat([latents, _draw(prior, batch, gen)])
                latents = latents.to(model.device, model.dtype) * model.vae.config.scaling_factor
                embeds = fixed_embeds
                if embeds is None:  # the text encoder trains too: embed with its current LoRA
                    embeds = model.encode_prompts(texts, [""] * len(texts), False)
                noise = torch.randn(latents.shape, generator=gen).to(model.device, model.dtype)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
                t = t.to(model.device)
                pred = model.unet_noise(noise_scheduler.add_noise(latents, noise, t), t, embeds).float()
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, t)
                err = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
                loss = err[:batch].mean() + (prior_weight * err[batch:].mean() if prior is not None else 0.0)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, float(train.get("max_grad_norm", 1.0)))
                opt.step()
            losses.append(loss.item())
        adapter = model.applied_adapter(name, init)
    adapter.validate_finite()
    return adapter, sum(losses[-10:]) / max(len(losses[-10:]), 1)


def class_prior_images(model, cls: str, train, out_dir: Path) -> list[Path]:
    """`num_class_images` base-model images of ``a photo of <class>`` (generated once, cached)."""
    folder = out_dir / "_class_images" / cls.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    wanted = int(train.get("num_class_images", 100))
    have = sorted(folder.glob("*.png"))
    if len(have) < wanted:
        images = model.generate([f"a photo of {cls}"], n_images=wanted, seed=int(train.get("seed", 0)) + 1,
                                num_inference_steps=int(train.get("class_inference_steps", 25)),
                                guidance_scale=float(train.get("class_guidance_scale", 7.5)), progress=True,
                                desc=f"class images {cls}")
        for i, image in enumerate(images):
            image.save(folder / f"{i:04d}.png")
        have = sorted(folder.glob("*.png"))
    return have[:wanted]


def load_pixels(paths, resolution: int) -> torch.Tensor:
    """Images resized (shorter side) and center-cropped to `resolution`, as (n, 3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path} ({exc})") from exc
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    if not out:
        raise DataError("no images to train on")
    return torch.stack(out)


@torch.no_grad()
def _latent_posterior(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image, on the CPU in float32."""
    dist = model.vae.encode(pixels.to(model.device, model.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def _draw(posterior: tuple[torch.Tensor, torch.Tensor], batch: int, gen: torch.Generator) -> torch.Tensor:
    mean, std = posterior
    idx = torch.randint(0, mean.shape[0], (batch,), generator=gen)
    return mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]
