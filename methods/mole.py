"""`method=mole`: Mixture of LoRA Experts (Wu et al., ICLR 2024; DESIGN §4).

The N frozen experts of every target matrix run as one stacked LoRA (`bench.lora.stacked.StackedLoraLinear`);
learnable gates weight their outputs, ``y = W x + Σ_i G_i · Δh_i(x)``, handed to each stacked layer per
forward through its `gate_fn` (one broadcast multiply and two GEMMs, no loop over experts).

Gate (one definition for both domains: `MoleGate`, also used by `methods.mole_diffusion`). The paper (Wu, Huang,
Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv 2404.13628; the gating function of its method section) defines,
for the N experts E_0 … E_{N−1} of a layer with input x:

    E_Ω(x) = Normalization(E_0(x) ⊕ … ⊕ E_{N−1}(x))      ⊕: concatenation
    ε      = Flatten(E_Ω(x))ᵀ · e                          e: a learnable (N·d × N) matrix, no bias
    G(ε)_i = exp(ε_i / τ) / Σ_j exp(ε_j / τ)                τ: a learnable temperature

(equation numbers are not cited: we could not check them against the paper's text).
"Normalization" is not specified further; ours is a parameter-free LayerNorm over each expert's d_out features
(``F.layer_norm`` without affine parameters, eps 1e-5), applied to each expert's output after pooling over the
sequence (see *Pooling*: the gate weights a whole sequence, so E_i(x) is the pooled output
``pool(Δh_i) = s_i B_i pool(A_i x)``). ``e`` is ``MoleGate.proj`` (``nn.Linear(N·d_out, N, bias=False)``); τ a
learnable scalar per gate, clamped to [`temperature_min`, `temperature_max`] = [1, 3] (clamped in the forward
and projected back into the range after every optimizer step). The linear layer starts at zero
(`init_std: 0`), so training starts from the uniform average of the experts (normalized linear arithmetic,
MoLE's baseline); τ starts at `temperature_init` (1). The gate computes in its parameters' dtype (float32;
float64 when the gate is cast, as the exactness tests do). Pooling is linear, so the pooled expert outputs
are computed from the pooled rank activations: no per-token (batch, seq, N, d) tensor is formed.

Granularity (`granularity`): which matrices share one gate. A *group* of matrices shares one gate module and,
within one forward pass, one weight vector per sequence:

- ``matrix``: one gate per LoRA'd matrix, reading that matrix's experts' outputs;
- ``layer``: one gate per sub-layer, i.e. per parent module of the LoRA'd matrices
  (``model.layers.3.self_attn``, ``model.layers.3.mlp``; T5: ``encoder.block.1.layer.0.SelfAttention``);
- ``block`` (default): one gate per transformer block (`bench.lora.stacked.block_of`: ``model.layers.3``), shared
  by all LoRA'd matrices of the block;
- ``network``: one gate for the whole model.

A shared gate reads the experts' outputs of its group's *lead*: the group's first LoRA'd matrix in model
order (for a Llama block with targets q_proj, v_proj: ``q_proj``; for ``network``: the first block's first
matrix; T5's decoder blocks use their first matrix ``layer.0.SelfAttention.q``). The others reuse the
weights the lead computed in the same forward pass. Later matrices cannot feed the gate because their inputs
depend on the gated outputs of the earlier ones. Gate input width is therefore N·d_out of the lead.

Pooling (what "pooled over the sequence" means, for training and for generation with a KV cache). The
official MoLE code is not public (yushuiwx/MoLE has only a README), so this is our definition:
a sequence gets one weight vector per group, computed when a sequence *starts* (a forward of the block stack
with an empty KV cache: the prompt's forward in `generate`, every forward in training and scoring) as the
mean over that forward's **prompt tokens** (non-padding, from the stack's 2-D `attention_mask`), and reused
for the generated tokens of that sequence (cached decoding steps do not recompute it; generating without a
KV cache re-reads the whole sequence at every step, so the gate is then recomputed over all of it). In training, the fit
loss is teacher-forced on prompt + target; the gate then pools over the prompt tokens only (the positions
whose label is -100 and whose attention mask is 1: `prompt_pooling`), so the gate never sees the target and
training matches inference. Seq2seq (T5): encoder groups pool over the encoder input (the prompt); decoder
groups over the decoder's first position (the start token: what the decoder's first generation step sees);
cross-attention key/value matrices that lead a `matrix` group pool over the encoder tokens. A forward without
this context (e.g. `LanguageModel.loss` called by someone else) pools over all its non-padding tokens.

Loss = task loss (`LanguageModel.loss`, mean target-token cross-entropy) + α · balance, α = 0.5,
``balance = −Σ_i log q_i``, q_i = mean of G_i over all gates (groups) and sequences of the batch.
Only the gates train (AdamW; paper: lr 1e-5, 800 steps, batch 12: config keys `lr`, `steps`, `batch_size`).

Masking (`masks: [[name, …], …]`): at inference, the named experts' logits are set to −inf before the softmax,
i.e. their weights drop out and the rest renormalize (``G_i / Σ_{j kept} G_j``), without retraining. `compose`
yields the unmasked model (variant "") and then one variant per mask set (``mask=e0`` or ``mask=e0+e3``).

Domains. `method=mole` is MoLE on every task: on a diffusion task (``ctx.model.domain == "vl"``, e.g.
``task=dreambooth``) `Mole.compose` runs the UNet / text-encoder form, `methods.mole_diffusion.MoleDiffusion`,
with the same gate, mapping the shared keys (`alpha`, `lr`, `steps`, `batch_size`, `masks`, `init_std`,
`weight_decay`, `betas`, `eps`; `temperature_init` -> `tau_init`, [`temperature_min`, `temperature_max`] ->
`tau_range`) and taking the diffusion-only keys from the `vl:` sub-key (`granularity` with the diffusion
choices, `train_steps`, `grad_steps`, `guidance_scale`, `negative_prompt`, `clip`; `diffusion_config`).
`method=mole_diffusion` remains as the diffusion form's own name (its YAML spells the keys the diffusion way).
The language-model trainer's `clip_grad`, `schedule` and `warmup_ratio` have no diffusion counterpart: a VL run
refuses non-default values rather than ignoring them. What still differs between the domains, and why:

- pooling: a language model's gate pools the prompt tokens once per sequence (generated tokens reuse it); the
  diffusion gate pools all tokens of its leader's input at every call (every denoising step, per batch row),
  since an image has no prompt/continuation split and its tokens change at every step;
- the lead matrix: here the group's first LoRA'd matrix in model order; there ``to_q`` / ``q_proj``;
- granularity names: the diffusion form has ``block`` (one gate per attention module, i.e. this file's
  ``layer`` for attention) and ``layer`` (one per LoRA'd linear, this file's ``matrix``);
- the objective: the task's teacher-forced loss here; CLIP text–image and image–image alignment there (the
  paper's V&L objective), both plus α · balance;
- masks: here a name outside the pool is an error; there it is ignored (a mask may name the subjects of several
  DreamBooth composition sets).

Saved gates (`GatedComposed.save`): `gates.safetensors` + `gates.json`; `attach_saved_gates` rebuilds them on
a fresh stacked model. Recorded: `info.gate_stats` = {group: [mean weight per expert]} over the fit examples
(per variant; `block` groups are named by their block path) and the final temperatures.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, block_of
from bench.models.generation import RowHooks
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.ops.gates import (GatedComposed, TrainConfig, check_saved_gates, count_params, info_common, load_gates,
                           reads_encoder, router_attached, stack_of, train_gates)
from methods.ops.mole_gate import MoleGate
from tasks.base import Example

GRANULARITIES = ("matrix", "layer", "block", "network")


def group_of(path: str, granularity: str) -> str:
    """The name of the gate group a module path belongs to at `granularity`."""
    if granularity == "matrix":
        return path
    if granularity == "layer":
        return path.rpartition(".")[0] or path
    if granularity == "block":
        return block_of(path)
    if granularity == "network":
        return "network"
    raise ConfigError(f"method.granularity={granularity!r}; choose one of {GRANULARITIES}")


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """``−Σ_i log q_i`` with q_i the mean of the gate weights of expert i over every leading dimension
    (gates × sequences); `weights` (..., N)."""
    q = weights.reshape(-1, weights.shape[-1]).mean(0)
    return -torch.log(q).sum()


def _key(group: str) -> str:
    return group.replace(".", ":") or "model"  # ModuleDict keys cannot hold dots


# ----------------------------------------------------------------------------------------- sequence state
@dataclass
class _StackState:
    past: int  # tokens already in the KV cache when this forward started
    mask: torch.Tensor | None  # (batch, past + current) 2-D attention mask, if given
    encoder_mask: torch.Tensor | None  # (batch, encoder tokens), for cross-attention inputs


class SequenceTracker:
    """Forward pre-hooks on the block stacks (``model``; T5: ``encoder``, ``decoder``) recording, for the
    stack's current forward, whether it starts a sequence (empty KV cache) and which tokens are real."""

    def __init__(self, model: nn.Module, stacks: Sequence[str]) -> None:
        self.modules = {s: (model.get_submodule(s) if s else model) for s in dict.fromkeys(stacks)}
        self.state: dict[str, _StackState] = {}
        self.override: dict[str, torch.Tensor] = {}  # stack -> (batch, tokens) pooling mask (training)
        self.handles = [m.register_forward_pre_hook(functools.partial(self._pre, s), with_kwargs=True)
                        for s, m in self.modules.items()]

    def _pre(self, stack: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        enc = kwargs.get("encoder_attention_mask")
        two_d = lambda m: m if isinstance(m, torch.Tensor) and m.dim() == 2 else None  # noqa: E731
        self.state[stack] = _StackState(past, two_d(mask), two_d(enc))

    def fresh(self, stack: str) -> bool:
        state = self.state.get(stack)
        return state is None or state.past == 0

    def pool_mask(self, stack: str, n_tokens: int, cross: bool = False) -> torch.Tensor | None:
        """(batch, n_tokens) mask of the tokens to pool, or None for all of them."""
        state = self.state.get(stack)
        if cross:
            enc = state.encoder_mask if state is not None else None
            return enc if enc is not None and enc.shape[-1] == n_tokens else None
        override = self.override.get(stack)
        if override is not None and override.shape[-1] == n_tokens:
            return override
        if state is not None and state.mask is not None and state.mask.shape[-1] >= n_tokens:
            return state.mask[:, -n_tokens:]
        return None

    def set_prompt_masks(self, batch: dict, is_seq2seq: bool) -> None:
        """Pool over the prompt tokens of a teacher-forced batch (`LanguageModel.encode_pairs` output)."""
        labels, mask = batch["labels"], batch["attention_mask"]
        self.override.clear()
        for stack, module in self.modules.items():
            if is_seq2seq:
                if getattr(module, "is_decoder", False):  # decoder: the start token, as at generation step 1
                    first = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
                    first[:, 0] = True
                    self.override[stack] = first
            else:
                self.override[stack] = mask.bool() & (labels == -100)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextlib.contextmanager
def prompt_pooling(lm, tracker: SequenceTracker) -> Iterator[None]:
    """Within the block, each teacher-forced batch that `lm.loss` encodes sets the pooling masks to its
    prompt tokens just before its forward (through the instance's `encode_pairs`, restored afterwards)."""
    original = lm.encode_pairs
    used: list[bool] = []

    def encode_pairs(*args, **kwargs):
        batch = original(*args, **kwargs)
        tracker.set_prompt_masks(batch, lm.is_seq2seq)
        used.append(True)
        return batch

    lm.encode_pairs = encode_pairs
    try:
        yield
    finally:
        del lm.encode_pairs
        tracker.override.clear()
    if not used:
        raise RuntimeError("prompt_pooling: LanguageModel.loss no longer calls encode_pairs; MoLE could not "
                           "restrict its gate pooling to the prompt tokens")


# ----------------------------------------------------------------------------------------- the router
class MoleRouter:
    """The gates of one model: sets each stacked layer's `gate_fn`, hooks the block stacks."""

    def __init__(self, model: nn.Module, layers: dict[str, StackedLoraLinear], granularity: str = "block",
                 temperature_init: float = 1.0, temperature_range: tuple[float, float] = (1.0, 3.0),
                 init_std: float = 0.0, seed: int = 0) -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError(f"method.granularity={granularity!r}; choose one of {GRANULARITIES}")
        self.granularity = granularity
        self.layers = layers
        first = next(iter(layers.values()))
        self.n_experts = first.n_experts
        generator = torch.Generator().manual_seed(int(seed))
        self.route: dict[str, tuple[str, bool, str]] = {}  # path -> (gate key, is lead, stack)
        self.leads: dict[str, str] = {}  # gate key -> lead path
        self.groups: dict[str, str] = {}  # gate key -> group name
        gates = {}
        for path, layer in layers.items():  # model order
            group = group_of(path, granularity)
            key = _key(group)
            is_lead = key not in gates
            if is_lead:
                gates[key] = MoleGate(self.n_experts, layer.out_features, temperature_init, temperature_range,
                                      init_std, generator)
                self.leads[key], self.groups[key] = path, group
            self.route[path] = (key, is_lead, stack_of(path))
        device = first.A_cat.device
        self.gates = nn.ModuleDict(gates).to(device)
        self.tracker = SequenceTracker(model, [self.route[p][2] for p in self.leads.values()])
        self.keep: torch.Tensor | None = None  # (N,) bool: inference mask
        self.fixed: torch.Tensor | None = None  # (N,) weights forced on every gate (tests, analysis)
        self.current: dict[str, torch.Tensor] = {}
        self.records: list[tuple[str, torch.Tensor]] = []  # (gate key, weights) of each gate computation
        for path, layer in layers.items():
            layer.gate_fn = functools.partial(self._gates, path)

    # -- forward
    def _gates(self, path: str, layer: StackedLoraLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        key, is_lead, stack = self.route[path]
        if is_lead and self.tracker.fresh(stack):
            weights = self._weights(key, layer, h, stack, reads_encoder(path))
            self.current[key] = weights
            self.records.append((key, weights))
        weights = self.current.get(key)
        if weights is None:
            raise RuntimeError(f"MoLE: {path} runs before its gate's lead {self.leads[key]} computed the weights")
        if h.dim() >= 3 and weights.dim() == 2 and weights.shape[0] != h.shape[0]:
            raise RuntimeError(f"MoLE: {path} sees a batch of {h.shape[0]} but its gate holds {weights.shape[0]} "
                               "sequences (a cached step of another batch?)")
        return weights

    def _weights(self, key: str, layer: StackedLoraLinear, h: torch.Tensor, stack: str, cross: bool) -> torch.Tensor:
        seq = h if h.dim() >= 3 else h.unsqueeze(0)
        seq = seq.reshape(seq.shape[0], -1, seq.shape[-1])
        mask = self.tracker.pool_mask(stack, seq.shape[1], cross)
        if mask is None:
            pooled_h = seq.mean(1)
        else:
            m = mask.to(seq.dtype).unsqueeze(-1)
            pooled_h = (seq * m).sum(1) / m.sum(1).clamp(min=1)
        pooled = layer.expert_outputs(pooled_h)  # (batch, N, d_out): pool(Δh_i) = s_i B_i pool(h_i)
        if self.fixed is not None:
            weights = self.fixed.to(pooled.device, torch.float32).expand(pooled.shape[0], self.n_experts)
        else:
            keep = None if self.keep is None else self.keep.to(pooled.device)
            weights = self.gates[key](pooled, keep)
        return weights if h.dim() >= 3 else weights[0]

    def row_hooks(self) -> "MoleRowHooks":
        """The generation engine's hooks: each sequence's gate weights follow it when finished rows leave."""
        return MoleRowHooks(self)

    # -- training helpers
    def parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def project(self) -> None:
        for gate in self.gates.values():
            gate.project_temperature()

    def set_mask(self, names: Sequence[str] | None, pool_names: Sequence[str]) -> None:
        """Drop the named experts at inference (None: keep all)."""
        if not names:
            self.keep = None
            return
        unknown = [n for n in names if n not in pool_names]
        if unknown:
            raise ConfigError(f"method.masks names unknown experts {unknown}; the pool has {list(pool_names)}")
        keep = torch.tensor([n not in names for n in pool_names])
        if not keep.any():
            raise ConfigError(f"method.masks {list(names)} drops every expert")
        self.keep = keep

    def stats(self) -> dict[str, list[float]]:
        """Mean weight per expert per group over the recorded gate computations (every sequence)."""
        by_key: dict[str, list[torch.Tensor]] = {}
        for key, weights in self.records:
            by_key.setdefault(key, []).append(weights.detach().reshape(-1, self.n_experts).float())
        return {self.groups[k]: torch.cat(v).mean(0).tolist() for k, v in by_key.items()}

    def temperatures(self) -> dict[str, float]:
        return {self.groups[k]: float(g.tau().detach()) for k, g in self.gates.items()}

    def config(self) -> dict:
        return {"granularity": self.granularity,
                "groups": {self.groups[k]: {"key": k, "lead": self.leads[k], "d": g.d} for k, g in self.gates.items()},
                "temperature_range": list(next(iter(self.gates.values())).temperature_range)}

    def remove(self) -> None:
        self.tracker.remove()
        for layer in self.layers.values():
            layer.gate_fn = None


class MoleRowHooks(RowHooks):
    """Per-sequence gate weights (computed on each sequence's prompt forward) index-selected with their rows."""

    def __init__(self, router: MoleRouter) -> None:
        self.router = router

    def select(self, keep: torch.Tensor) -> None:
        current = self.router.current
        for key, weights in current.items():
            if weights.dim() == 2:
                current[key] = weights[keep.to(weights.device)]


@contextlib.contextmanager
def mole_attached(lm, pool: ExpertPool, granularity: str = "block", temperature_init: float = 1.0,
                  temperature_range: tuple[float, float] = (1.0, 3.0), init_std: float = 0.0,
                  seed: int = 0) -> Iterator[MoleRouter]:
    """`lm`'s model with the pool's experts stacked and MoLE gates attached, for the span of the block."""
    with router_attached(lm, pool, lambda model, layers: MoleRouter(
            model, layers, granularity, temperature_init, temperature_range, init_std, seed)) as router:
        yield router


@contextlib.contextmanager
def attach_saved_gates(lm, pool: ExpertPool, folder) -> Iterator[MoleRouter]:
    """A fresh stacked model with the gates saved in `folder` (and the mask of the saved variant)."""
    state, config = load_gates(folder)
    check_saved_gates(config, "mole", pool.names, pool.module_names)
    lo, hi = config["temperature_range"]
    with mole_attached(lm, pool, config["granularity"], temperature_range=(lo, hi)) as router:
        router.gates.load_state_dict(state)
        router.set_mask(config.get("mask"), pool.names)
        yield router


# ----------------------------------------------------------------------------------------- the method
# keys of the language-model trainer (`TrainConfig`) the diffusion trainer does not have: a VL run refuses any value
# but these defaults rather than ignoring it
_NLP_ONLY_TRAINING = {"clip_grad": None, "schedule": "constant", "warmup_ratio": 0.0}


def diffusion_config(cfg: DictConfig) -> DictConfig:
    """The `methods.mole_diffusion` config that `method=mole` runs on a diffusion task: the shared keys mapped
    to the diffusion spelling, the diffusion-only keys from ``cfg.vl`` (defaults: `conf/method/mole.yaml`)."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)  # in its root
    vl = cfg.get("vl") or {}
    out = {"name": "mole",
           "granularity": vl.get("granularity", "block"),
           "tau_init": cfg.get("temperature_init", 1.0),
           "tau_range": [cfg.get("temperature_min", 1.0), cfg.get("temperature_max", 3.0)],
           "init_std": cfg.get("init_std", 0.0),
           "alpha": cfg.get("alpha", 0.5),
           "lr": cfg.get("lr", 1.0e-5), "steps": cfg.get("steps", 800), "batch_size": cfg.get("batch_size", 12),
           "weight_decay": cfg.get("weight_decay", 0.01), "betas": cfg.get("betas", [0.9, 0.999]),
           "eps": cfg.get("eps", 1.0e-8),
           "train_steps": vl.get("train_steps", 10), "grad_steps": vl.get("grad_steps", 1),
           "guidance_scale": vl.get("guidance_scale", 7.5), "negative_prompt": vl.get("negative_prompt", ""),
           "masks": cfg.get("masks") or [], "clip": vl.get("clip")}
    return OmegaConf.create(out)


@register_method("mole")
class Mole(Method):
    """MoLE on language models (this module) and, on diffusion tasks, `methods.mole_diffusion` (module
    docstring, *Domains*)."""

    domains = ("nlp", "vl")

    def check_config(self) -> None:
        from methods.mole_diffusion import MoleDiffusion

        cfg = self.cfg
        if cfg.get("granularity", "block") not in GRANULARITIES:
            raise ConfigError(f"method.granularity={cfg.get('granularity')!r}; choose one of {GRANULARITIES}")
        if float(cfg.get("alpha", 0.5)) < 0:
            raise ConfigError(f"method.alpha={cfg.get('alpha')}: must be ≥ 0")
        lo, hi = float(cfg.get("temperature_min", 1.0)), float(cfg.get("temperature_max", 3.0))
        if not 0 < lo <= hi:
            raise ConfigError(f"method.temperature_min/max = {lo}/{hi}: need 0 < min ≤ max")
        masks = cfg.get("masks") or []
        if any(isinstance(m, str) or not len(m) for m in masks):
            raise ConfigError(f"method.masks={masks}: a list of non-empty lists of expert names, e.g. [[e0], [e1, e2]]")
        self.train_config = TrainConfig.from_cfg(cfg)
        self.diffusion = MoleDiffusion(diffusion_config(cfg))  # the diffusion form, its keys validated too

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        if getattr(ctx.model, "domain", "nlp") == "vl":  # diffusion models: the UNet / text-encoder form
            for key, default in _NLP_ONLY_TRAINING.items():
                if self.cfg.get(key, default) != default:
                    raise ConfigError(f"method.{key}={self.cfg.get(key)}: the diffusion form of MoLE has no such "
                                      f"option (leave it at {default!r} for diffusion tasks)")
            yield from self.diffusion.compose(ctx)
            return
        cfg, tc = self.cfg, self.train_config
        alpha = float(cfg.get("alpha", 0.5))
        masks = [list(m) for m in (cfg.get("masks") or [])]
        lm, examples = ctx.model, list(ctx.fit_examples)
        torch.manual_seed(ctx.seed)
        with mole_attached(lm, ctx.pool, cfg.get("granularity", "block"), float(cfg.get("temperature_init", 1.0)),
                           (float(cfg.get("temperature_min", 1.0)), float(cfg.get("temperature_max", 3.0))),
                           float(cfg.get("init_std", 0.0)), ctx.seed) as router:
            for mask in masks:  # fail before training on a bad mask
                router.set_mask(mask, ctx.pool.names)
            router.set_mask(None, ctx.pool.names)
            fit_loss = functools.partial(evaluate, lm, router, examples, ctx.prompt, tc)
            with Timer() as timer:
                initial, _, _ = fit_loss()

                def objective(batch: list[Example]) -> torch.Tensor:
                    task, balance = step_loss(lm, router, batch, ctx.prompt, tc.max_len)
                    return task + alpha * balance

                result = train_gates(router.parameters(), examples, objective, tc, ctx.seed, after_step=router.project,
                                     desc=f"fit mole {ctx.unit}")
                final, balance, stats = fit_loss()
            base_config = {"method": "mole", "experts": ctx.pool.names, "base_model": ctx.pool.base_model,
                           "modules": ctx.pool.module_names, "alpha": alpha, **router.config()}
            info = {**info_common(tc, initial, final, result.history), "train_seconds": result.seconds,
                    "alpha": alpha, "fit_balance": balance,
                    "granularity": router.granularity, "steps_config": tc.steps,
                    "temperatures": router.temperatures(), "gate_stats": stats, "mask": None}
            report = FitReport(examples=len(examples), steps=result.steps, seconds=timer.seconds,
                               trained_params=count_params(router.gates), info=info)
            yield GatedComposed(lm, report, "", gates=router.gates, gate_config={**base_config, "mask": None},
                                 hooks=router.row_hooks())
            for mask in masks:
                router.set_mask(mask, ctx.pool.names)
                masked_loss, masked_balance, masked_stats = fit_loss()
                masked_info = {**info, "mask": mask, "gate_stats": masked_stats, "final_fit_loss": masked_loss,
                               "fit_balance": masked_balance}
                masked = FitReport(report.examples, report.steps, report.seconds, report.trained_params, masked_info)
                yield GatedComposed(lm, masked, "mask=" + "+".join(mask), gates=router.gates,
                                    gate_config={**base_config, "mask": mask}, hooks=router.row_hooks())
            router.set_mask(None, ctx.pool.names)


def step_loss(lm, router: MoleRouter, batch: Sequence[Example], prompt: Callable[[Example], str],
              max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, balance loss) of one batch, in one forward with prompt pooling."""
    router.records.clear()
    with prompt_pooling(lm, router.tracker):
        task = lm.loss([prompt(e) for e in batch], [e.train_target for e in batch], batch_size=len(batch),
                       max_len=max_len)
    weights = torch.stack([w.reshape(-1, router.n_experts) for _, w in router.records])  # (gates, batch, N)
    return task, balance_loss(weights)


@torch.no_grad()
def evaluate(lm, router: MoleRouter, examples: Sequence[Example], prompt: Callable[[Example], str],
             tc: TrainConfig) -> tuple[float | None, float | None, dict[str, list[float]]]:
    """(mean task loss, balance loss, gate statistics) over `examples`, as the training objective sees them
    (under an inference mask the balance term is over the kept experts); Nones without examples."""
    if not examples:
        return None, None, {}
    router.records.clear()
    with prompt_pooling(lm, router.tracker):
        loss = lm.loss([prompt(e) for e in examples], [e.train_target for e in examples],
                       batch_size=tc.batch_size, max_len=tc.max_len)
    weights = torch.cat([w.reshape(-1, router.n_experts) for _, w in router.records])
    if router.keep is not None:  # balance over the experts the mask keeps (the dropped ones weigh 0)
        weights = weights[:, router.keep.to(weights.device)]
    stats = router.stats()
    router.records.clear()
    return float(loss), float(balance_loss(weights)), stats
