"""`method=mole_diffusion` (also what `method=mole` runs on a diffusion task): MoLE (Mixture of LoRA Experts, Wu et
al., ICLR 2024) on the diffusion UNet / text encoder.

Frozen experts, all N computed as one stacked LoRA per layer (`bench.lora.stacked.StackedLoraLinear`). A learnable gate per
block (``granularity: block``: one per attention module, ``attn1`` / ``attn2`` / ``self_attn``; ``layer``: one per
LoRA'd linear layer). Every layer of the block adds ``Σ_i G_i Δh_i`` (per batch row) to its frozen output.

Gate: the same definition and class as the language-model form (`methods.ops.mole_gate.MoleGate`; the paper's gating function,
written out in `methods.mole`'s docstring): ``G = softmax(e · Flatten(concat_i LayerNorm(E_i)) / τ)`` with E_i the
experts' outputs ``s_i B_i A_i x`` of the block's leading layer (``to_q`` / ``q_proj``, the first one the block runs),
mean-pooled over the tokens of that call; LayerNorm parameter-free over each expert's d features (eps 1e-5); ``e`` a
linear map N·d -> N **without bias**, zero-initialized (training starts from uniform weights 1/N); τ learnable,
clamped to `tau_range` = [1, 3] in the forward and projected back into it after every optimizer step. (Earlier versions
of this file L2-normalized each expert output and added a bias: a second definition, in neither the paper nor the LM
form.) What still differs from the language-model form, and why (pooling over every token at every call, the leading
layer, granularity names, the CLIP objective, mask names): `methods.mole`'s docstring, *Domains*.

Training (the V&L objective of MoLE: text–image and image–image alignment under CLIP, plus the balance loss): for a
batch of fit examples (a neutral prompt of the set and one reference photo of one subject) sample images with the
gates in place (``train_steps`` denoising steps, gradients through the last ``grad_steps`` of them only: truncated
backpropagation through sampling), decode, embed with CLIP and minimise
``-(cos(image, text) + cos(image, reference)) + α · (−Σ_i log q_i)``, q_i the mean gate weight of expert i over
gates and batch. Only gates train (AdamW: `lr`, `weight_decay`, `betas`, `eps`; defaults 0.01, (0.9, 0.999), 1e-8 as
the LM form's). CLIP is ``method.clip`` (``method.vl.clip`` under ``method=mole``; by default the task's scorer,
``task.clip``).

Inference option ``masks: [[expert names], ...]``: for each mask, those experts' logits are dropped and the rest
renormalized, without retraining; each masked model is yielded as its own variant (``mask=a+b``) after the unmasked
one. Names outside the composed pool are ignored (a mask can name subjects of several composition sets).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from bench.errors import ConfigError
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.ops.mole_gate import MoleGate

GRANULARITIES = ("block", "layer")
_LEADERS = ("to_q", "q_proj")


Gate = MoleGate  # the diffusion form's gate is the language-model form's (one definition)


class MoleGates(torch.nn.Module):
    """The gates of every block of a model whose LoRA layers are stacked (an `ExpertMix`'s `StackedLoraLinear`s)."""

    def __init__(self, mix, root: torch.nn.Module, granularity: str, tau_init: float = 1.0,
                 tau_range: tuple[float, float] = (1.0, 3.0), init_std: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.n, self.granularity = mix.n, granularity
        self.block_of = {path: _block(root, path) if granularity == "block" else path for path in mix.layers}
        members: dict[str, list[str]] = {}
        for path, block in self.block_of.items():
            members.setdefault(block, []).append(path)
        self.leader = {block: _leader(paths) for block, paths in members.items()}
        self.keys = {block: f"g{i}" for i, block in enumerate(sorted(members))}
        generator = torch.Generator().manual_seed(int(seed))
        self.gates = torch.nn.ModuleDict({
            self.keys[block]: MoleGate(self.n, mix.layers[self.leader[block]].out_features, tau_init, tau_range,
                                       init_std, generator)
            for block in sorted(members)
        })
        self.mask: torch.Tensor | None = None  # (N,) bool: True drops the expert
        self.recorded: list[torch.Tensor] | None = None  # gate outputs of the current training step
        self._cache: dict[str, torch.Tensor] = {}

    def weights(self, layer, h: torch.Tensor) -> torch.Tensor:
        """The gate callable of `ExpertMix.gated`: (batch, N) weights for `layer` given its rank activations
        ``h = A_cat x``."""
        block = self.block_of[layer.path]
        if layer.path != self.leader[block]:
            if block not in self._cache:
                raise RuntimeError(f"MoLE gate of {block}: {layer.path} ran before the block's leading layer "
                                   f"{self.leader[block]} (use granularity=layer for this architecture)")
            return self._cache[block]
        pooled = h.mean(dim=tuple(range(1, h.dim() - 1))) if h.dim() > 2 else h
        keep = None if self.mask is None else ~self.mask.to(h.device)
        w = self.gates[self.keys[block]](layer.expert_outputs(pooled), keep)
        if self.recorded is not None:
            self.recorded.append(w)
        self._cache[block] = w
        return w

    def project(self) -> None:
        """Every gate's τ back into its range (after an optimizer step)."""
        for gate in self.gates.values():
            gate.project_temperature()

    def clear(self, block: str) -> None:
        self._cache.pop(block, None)

    def register_block_hooks(self, root: torch.nn.Module) -> list:
        """Forward pre-hooks that forget a block's gate when the block starts (so no stale weights are read)."""
        return [root.get_submodule(block).register_forward_pre_hook(lambda *_, b=block: self.clear(b))
                for block in self.leader if block in dict(root.named_modules())]

    def set_mask(self, names: list[str], pool_names: list[str]) -> None:
        self.mask = torch.tensor([n in names for n in pool_names]) if names else None


def _block(root: torch.nn.Module, path: str) -> str:
    """The nearest ancestor of `path` that is an attention module (else its parent)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:i])
        if type(root.get_submodule(ancestor)).__name__.endswith("Attention"):
            return ancestor
    return ".".join(parts[:-1])


def _leader(paths: list[str]) -> str:
    for leaf in _LEADERS:
        for path in paths:
            if path.rsplit(".", 1)[-1] == leaf:
                return path
    return sorted(paths)[0]


def balance_loss(recorded: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(−Σ_i log q_i, q): q_i is expert i's mean gate weight over the recorded gates and batch rows."""
    q = torch.stack([w.float().mean(0) for w in recorded]).mean(0)
    return -torch.log(q.clamp_min(1e-12)).sum(), q


class MoleComposed(Composed):
    """A MoLE model; `save` writes the gates (safetensors) and what they gate (JSON)."""

    gates: MoleGates | None = None

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.gates.state_dict().items()},
                  str(folder / "gates.safetensors"))
        info = {"experts": self.report.info.get("experts"), "granularity": self.gates.granularity,
                "blocks": {self.gates.keys[b]: {"block": b, "leader": p} for b, p in self.gates.leader.items()}}
        (folder / "gates.json").write_text(json.dumps(info, indent=2))
        return folder


@register_method("mole_diffusion")
class MoleDiffusion(Method):
    domains = ("vl",)

    def check_config(self) -> None:
        cfg = self.cfg
        if cfg.get("granularity", "block") not in GRANULARITIES:
            raise ConfigError(f"method.granularity={cfg.granularity!r}; choose one of {GRANULARITIES}")
        for key in ("steps", "batch_size", "train_steps"):
            if int(cfg.get(key, 1)) < (0 if key == "steps" else 1):
                raise ConfigError(f"method.{key}={cfg.get(key)}: must be positive")
        if not 1 <= int(cfg.get("grad_steps", 1)) <= int(cfg.get("train_steps", 1)):
            raise ConfigError("method.grad_steps must be between 1 and method.train_steps")
        lo, hi = (float(v) for v in cfg.get("tau_range", (1.0, 3.0)))
        if not 0 < lo <= hi:
            raise ConfigError(f"temperature range {lo}..{hi} (method.tau_range; method=mole: temperature_min/max): "
                              "need 0 < min ≤ max")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        cfg = self.cfg
        if getattr(ctx.model, "domain", "nlp") != "vl":
            raise ConfigError("mole_diffusion needs a diffusion model (method=mole runs MoLE on language models too)")
        model = ctx.model
        with model.experts_applied(ctx.pool) as mix:
            gates = MoleGates(mix, model.components, str(cfg.get("granularity", "block")),
                              float(cfg.get("tau_init", 1.0)), tuple(cfg.get("tau_range", (1.0, 3.0))),
                              float(cfg.get("init_std", 0.0)), ctx.seed).to(model.device)
            handles = gates.register_block_hooks(model.components)
            mix.gated(gates.weights)
            try:
                with Timer() as timer:
                    info = self.train(ctx, gates)
                gates.requires_grad_(False)
                trained = sum(p.numel() for p in gates.parameters())
                report = FitReport(examples=len(ctx.fit_examples), steps=int(cfg.steps), seconds=timer.seconds,
                                   trained_params=trained, info={"experts": ctx.pool.names, **info})
                composed = MoleComposed(model, report)
                composed.gates = gates
                yield composed
                for mask in cfg.get("masks") or []:
                    masked = [n for n in ctx.pool.names if n in mask]
                    if not masked:
                        continue
                    if len(masked) == len(ctx.pool):
                        raise ConfigError(f"method.masks: {list(mask)} would drop every expert of {ctx.pool.names}")
                    gates.set_mask(masked, ctx.pool.names)
                    masked_composed = MoleComposed(model, report, f"mask={'+'.join(masked)}")
                    masked_composed.gates = gates
                    yield masked_composed
                gates.set_mask([], ctx.pool.names)
            finally:
                for handle in handles:
                    handle.remove()

    def train(self, ctx: FitContext, gates: MoleGates) -> dict:
        """Fit the gates on the CLIP alignment objective plus the balance loss; returns what to report."""
        from tasks.clip_score import ClipScorer

        cfg, model = self.cfg, ctx.model
        steps = int(cfg.steps)
        if steps == 0:
            return {"loss": None}
        if not ctx.fit_examples:
            raise ConfigError("mole_diffusion trains its gates on fit examples; the run provides none")
        clip_cfg = cfg.get("clip")
        if clip_cfg is None:
            raise ConfigError("mole_diffusion needs a CLIP model: method.clip (by default the task's task.clip)")
        scorer = ClipScorer.from_config(clip_cfg, model.device, clip_cfg.get("cache_dir"))
        targets = [json.loads(e.target) for e in ctx.fit_examples]
        if any("image" not in t for t in targets):
            raise ConfigError("mole_diffusion needs fit examples with a reference image (task=dreambooth)")
        from PIL import Image

        texts = scorer.encode_texts([t["clip_text"] for t in targets])
        refs = scorer.encode_images([Image.open(t["image"]).convert("RGB") for t in targets])
        opt = torch.optim.AdamW([p for p in gates.parameters() if p.requires_grad], lr=float(cfg.lr),
                                weight_decay=float(cfg.get("weight_decay", 0.01)),
                                betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
                                eps=float(cfg.get("eps", 1e-8)))
        rng = random.Random(ctx.seed)
        gen = torch.Generator("cpu").manual_seed(int(ctx.seed))
        batch_size, alpha = int(cfg.batch_size), float(cfg.get("alpha", 0.5))
        guidance, negative = float(cfg.guidance_scale), str(cfg.get("negative_prompt") or "")
        history = []
        for _ in tqdm(range(steps), desc="mole_diffusion gates", leave=False):
            idx = [rng.randrange(len(targets)) for _ in range(batch_size)]
            noise = torch.randn((batch_size, *model.latent_shape), generator=gen)
            gates.recorded = []
            with torch.enable_grad():
                embeds = model.encode_prompts([ctx.fit_examples[i].input for i in idx], [negative] * batch_size,
                                              guidance > 1.0)
                latents = model.sample(noise, embeds, int(cfg.train_steps), guidance, grad_steps=int(cfg.grad_steps))
                features = scorer.encode_pixels(model.decode(latents))
                align = ((features * texts[idx]).sum(-1) + (features * refs[idx]).sum(-1)).mean()
                balance, q = balance_loss(gates.recorded)
                loss = -align + alpha * balance
                opt.zero_grad()
                loss.backward()
                opt.step()
                gates.project()
            gates.recorded = None
            history.append(loss.item())
        return {"loss_first": history[0], "loss_last": history[-1], "clip": scorer.label, "alpha": alpha,
                "mean_gate": [round(float(v), 4) for v in q.detach()]}
