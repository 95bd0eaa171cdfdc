"""CLIP-T and CLIP-I with open_clip (DreamBooth's metrics).

CLIP-T of an image: the cosine between its CLIP image embedding and the embedding of its prompt. CLIP-I of an image
for a subject: the mean cosine between its embedding and those of the subject's reference photos.

The scorer comes from config: ``model`` + ``pretrained`` (``create_model_and_transforms(model, pretrained=...)``, e.g.
ViT-B-32 / openai), or ``model: tiny``: a small CLIP with seeded random weights from the ``tiny`` model config, saved
once as an open_clip ``local-dir`` folder (``open_clip_config.json`` + safetensors) under ``<cache_dir>/models/`` and
loaded through the same ``create_model_and_transforms("local-dir:...")`` path; its tokenizer is open_clip's bundled
BPE. A tiny scorer's numbers are meaningless, and `info()` says so for the records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from bench.errors import ConfigError

TINY_LABEL = "tiny-random (meaningless)"


@dataclass
class ClipScorer:
    model: Any  # open_clip.CLIP
    preprocess: Any  # torchvision transform of one PIL image
    tokenizer: Any
    device: torch.device
    label: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int = 32

    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> "ClipScorer":
        import open_clip

        name = str(cfg.get("model") or "")
        if not name:
            raise ConfigError("clip.model is not set (an open_clip model name such as ViT-B-32, or 'tiny')")
        if name == "tiny":
            folder = _materialize_tiny(cfg, Path(cache_dir or cfg.get("cache_dir") or Path.home() / ".cache" / "bench"))
            model_name, pretrained, label = f"local-dir:{folder}", None, TINY_LABEL
        else:
            model_name, pretrained = name, cfg.get("pretrained")
            label = f"open_clip {name}/{pretrained}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device,
                cache_dir=str(cache_dir) if cache_dir and name != "tiny" else None,
            )
        except Exception as exc:  # unknown name, offline without cached weights
            raise ConfigError(f"clip scorer {name!r} (pretrained={pretrained!r}): {type(exc).__name__}: {exc}") from exc
        model.eval().requires_grad_(False)
        pcfg = open_clip.get_model_preprocess_cfg(model)
        size = pcfg["size"] if isinstance(pcfg["size"], int) else pcfg["size"][0]
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), torch.device(device), label, int(size),
                   tuple(pcfg["mean"]), tuple(pcfg["std"]), int(cfg.get("batch_size", 32)))

    def info(self) -> dict:
        return {"scorer": self.label}

    # ----------------------------------------------------------------- embeddings (unit norm, float32)
    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> (n, D) unit embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + self.batch_size]]).to(self.device)
            out.append(F.normalize(self.model.encode_image(batch).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> unit embeddings, differentiable (square images: resize, normalize)."""
        x = F.interpolate(pixels.float(), size=(self.size, self.size), mode="bicubic", antialias=True,
                          align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image((x - mean) / std).float(), dim=-1)

    # ----------------------------------------------------------------- metrics
    def clip_t(self, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
        """(n,) cosine of image k with text k."""
        return (self.encode_images(images) * self.encode_texts(texts)).sum(-1)

    def clip_i(self, images: Sequence, references: torch.Tensor) -> torch.Tensor:
        """(n,) mean cosine of each image with the reference embeddings (m, D) of one subject."""
        return (self.encode_images(images) @ references.T).mean(-1)


def _materialize_tiny(cfg, cache_dir: Path) -> Path:
    """Build the tiny CLIP once (seeded) as an open_clip local-dir folder; keyed by a hash of its config."""
    import open_clip
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    model_cfg = OmegaConf.to_container(cfg.tiny, resolve=True) if not isinstance(cfg.tiny, dict) else dict(cfg.tiny)
    seed = int(cfg.get("seed", 0))
    key = hashlib.sha256(json.dumps([model_cfg, seed], sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir / "models" / f"tiny-clip-{key}"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}, indent=2))
    tmp.rename(folder)
    return folder
