"""`method=cat`: CAT, learnable concatenation of LoRAs ("LoRA Soups", Prabhakar et al., COLING 2025 Industry).

For every LoRA'd module l (each adapted linear layer, not each block) and expert i, one learnable logit θ_{l,i};
the module's expert weights are ``w_l = softmax_i(θ_l)`` and it computes

    y = W x + Σ_i w_{l,i} s_i B_i A_i x  =  W x + B'_l A'_l x,
    A'_l = [A_1; …; A_N]  (Σ r_i × d_in),   B'_l = [w_{l,1} s_1 B_1, …, w_{l,N} s_N B_N]  (d_out × Σ r_i),

the experts' scales s_i = alpha_i / r_i inside, each expert frozen, only θ trained (n_modules · N numbers) on the
task's fit examples. The result is one LoRA of rank Σ r_i per module, scale 1 (`cat_merge`, built with
`methods.linear.concat_merge`), which the task evaluates folded into the base weights and `Composed.save` writes
as a peft folder. During training the experts run as one stacked LoRA (`bench.lora.stacked.StackedLoraLinear`)
whose per-layer gates (N,) are the module's w_l (`cat_attached`).

Official code read: github.com/aksh555/LoRA-Soups at commit 7ce7a2e6ddde687db5a15bdabbbea4516f042bf6 —
`learnable_lora/lora/layer.py` (`LoraLayer.update_layer`: ``lora_learnable_weights[adapter] =
nn.Parameter(torch.randn(1))`` per LoRA'd Linear and adapter; `Linear.forward`, ``lora_mix_mode == "cat"``:
``result += lora_B(lora_A(x)) * scaling * softmax(weights)[idx]``), `cat_train.py` (only parameters named
``lora_learnable`` train; HF Trainer: adamw_torch, lr 1e-4, 1 epoch, warmup_steps 100 then linear decay,
weight decay 0, max_grad_norm 1.0, fp16 autocast, cutoff_len 256), `train_cat.sh` (batch 10 / micro-batch 6:
gradient accumulation 10 // 6 = 1, so 6 examples per step; ~10k mixed examples: ≈1,650 steps), `cat_eval.py`.

Followed: per-module per-expert weights, softmax over the experts, scale inside, logits ~ N(0, 1), AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), lr 1e-4, gradient clipping 1.0, 1 epoch over the fit examples,
batch 6, HF's linear schedule (lr ramps from 0 over the warm-up, then decays linearly to 0).
Deviations:
- warm-up: the official 100 steps were ≈6 % of its ≈1,650 steps; here ``warmup_ratio: 0.06`` of the steps
  (HF: ceil(ratio · steps) warm-up steps, the first of which has lr 0). With the benchmark's few fit examples
  and the official 1 epoch at lr 1e-4 the weights barely move from their initialisation (K = 5: one step at
  lr 0): that is what the official recipe does at this data size; set `steps`/`lr` for a longer fit.
- loss: the project's target-token cross-entropy (`LanguageModel.loss`, mean over examples of each example's
  mean), not the official loss over prompt and response tokens (``train_on_inputs=True``, token mean).
- initialisation: the official ``torch.randn(1)`` comes from the unseeded global RNG in module order; here
  θ_{l,i} is drawn from a generator seeded by (run seed, expert name), one value per module in sorted module
  order, so the draw is reproducible and follows its expert when the pool is reordered.
- no held-out validation split and no best-checkpoint selection (official: 120 examples, eval every 80 steps,
  load_best_model_at_end); float32 training, no fp16 autocast; prompts truncated from the left to `max_len`.
Options beyond the official code: ``init`` a number or one value per expert (constant logits: w = 1/N under
softmax), ``softmax: false`` (w = θ unconstrained: the paper's α_l, β_l written without a softmax; with
``init: 1.0`` it starts at the plain concatenation = the sum of the experts), ``schedule: constant | cosine``.

Recorded (`FitReport.info`): initial and final fit loss, the weights {module: {expert: w}}, their mean per
expert, the composed rank per module. `perf_forwards` gives the perf benchmark a synthetic layer's forwards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, stacked_experts
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.linear import concat_merge
from methods.ops.gates import TrainConfig, info_common, train_gates
from tasks.base import Example


# ----------------------------------------------------------------------------------------- the weights
class CatWeights(nn.Module):
    """The learnable logits θ (n_modules × N) and the per-module expert weights w_l = softmax(θ_l) (or θ_l)."""

    def __init__(self, modules: Sequence[str], logits: torch.Tensor, softmax: bool = True) -> None:
        super().__init__()
        if logits.shape[0] != len(modules):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(modules)} modules")
        self.modules_ = list(modules)
        self.index = {m: i for i, m in enumerate(self.modules_)}
        self.softmax = bool(softmax)
        self.logits = nn.Parameter(logits.detach().clone().float())

    def weights(self) -> torch.Tensor:
        """w (n_modules × N), float32, differentiable."""
        return torch.softmax(self.logits, dim=-1) if self.softmax else self.logits

    def of(self, module: str) -> torch.Tensor:
        """w_l (N,) of one module."""
        row = self.logits[self.index[module]]
        return torch.softmax(row, dim=-1) if self.softmax else row

    def table(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        w = self.weights().detach().cpu().tolist()
        return {m: dict(zip(names, row)) for m, row in zip(self.modules_, w)}


def expert_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for expert `name`'s initial logits under run seed `seed`."""
    return int.from_bytes(hashlib.sha256(f"cat:{int(seed)}:{name}".encode()).digest()[:8], "little") >> 1


def initial_logits(init, names: Sequence[str], modules: Sequence[str], seed: int) -> torch.Tensor:
    """θ at step 0 (n_modules × N, float32), modules and experts in the given orders.

    ``init="randn"``: θ_{l,i} ~ N(0, 1) (the official ``torch.randn(1)``), expert i's values drawn from a
    generator seeded by (seed, name_i), one per module in sorted module order; a number: every θ equal to it;
    a list (one value per expert, pool order) or {expert: value}: θ_{l,i} = value_i for every module."""
    n, m = len(names), len(modules)
    if isinstance(init, str):
        if init != "randn":
            raise ConfigError(f"method.init={init!r}: 'randn', a number, or one number per expert")
        order = sorted(modules)
        position = [order.index(mod) for mod in modules]
        cols = []
        for name in names:
            g = torch.Generator().manual_seed(expert_seed(seed, name))
            draw = torch.randn(m, generator=g)
            cols.append(draw[position])
        return torch.stack(cols, dim=1)
    if isinstance(init, (int, float)):
        return torch.full((m, n), float(init))
    if hasattr(init, "keys"):
        unknown = sorted(set(init) - set(names))
        if unknown:
            raise ConfigError(f"method.init names unknown experts {unknown}; pool: {list(names)}")
        missing = sorted(set(names) - set(init))
        if missing:
            raise ConfigError(f"method.init has no value for experts {missing}")
        values = [float(init[name]) for name in names]
    else:
        values = [float(v) for v in init]
        if len(values) != n:
            raise ConfigError(f"method.init has {len(values)} values for a pool of {n} experts")
    return torch.tensor(values).expand(m, n).clone()


# ----------------------------------------------------------------------------------------- the layer
def cat_gates(weights: CatWeights, layer: StackedLoraLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`StackedLoraLinear.gate_fn`: the layer's per-layer gates (N,) = w_l."""
    return weights.of(layer.path)


@contextlib.contextmanager
def cat_attached(lm, pool: ExpertPool, logits: torch.Tensor, softmax: bool = True) -> Iterator[CatWeights]:
    """`lm`'s model with the pool's experts stacked, each module gated by its CAT weights w_l (the composed
    layer ``W x + Σ_i w_{l,i} s_i B_i A_i x``), for the span of the block; yields the `CatWeights`."""
    with stacked_experts(lm.model, pool) as layers:
        weights = CatWeights(pool.module_names, logits, softmax).to(next(iter(layers.values())).A_cat.device)
        for layer in layers.values():
            layer.gate_fn = functools.partial(cat_gates, weights)
        try:
            yield weights
        finally:
            for layer in layers.values():
                layer.gate_fn = None


def cat_merge(adapters: Sequence[LoraAdapter], weights: dict[str, Sequence[float]], name: str = "cat") -> LoraAdapter:
    """The CAT LoRA: per module l, ``A' = [A_1; …; A_N]``, ``B' = [w_{l,1} s_1 B_1, …, w_{l,N} s_N B_N]``, scale 1
    (rank Σ r_i), i.e. `methods.linear.concat_merge` applied module by module with that module's weights."""
    modules = {}
    for module in adapters[0].modules:
        parts = [LoraAdapter(a.name, a.base_model, {module: a.modules[module]}, task_type=a.task_type)
                 for a in adapters]
        modules[module] = concat_merge(parts, [float(w) for w in weights[module]], name).modules[module]
    return LoraAdapter(name, adapters[0].base_model, modules, task_type=adapters[0].task_type)


# ----------------------------------------------------------------------------------------- training
@register_method("cat")
class Cat(Method):
    domains = ("nlp",)

    def check_config(self) -> None:
        cfg = self.cfg
        if cfg.get("lr") is None or cfg.get("batch_size") is None:
            raise ConfigError(f"method.{'lr' if cfg.get('lr') is None else 'batch_size'} must be set")
        init = cfg.get("init", "randn")
        if isinstance(init, bool) or init is None:
            raise ConfigError(f"method.init={init!r}: 'randn', a number, or one number per expert")
        if isinstance(init, str):
            if init != "randn":
                raise ConfigError(f"method.init={init!r}: 'randn', a number, or one number per expert")
        elif not isinstance(init, (int, float)):
            values = list(init.values()) if hasattr(init, "keys") else list(init)
            if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"method.init={init}: a non-empty list (or mapping) of numbers, one per expert")
        if not isinstance(cfg.get("softmax", True), bool):
            raise ConfigError(f"method.softmax={cfg.get('softmax')!r}: true or false")
        self.train_config = TrainConfig.from_cfg(cfg)

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        cfg, tc = self.cfg, self.train_config
        lm, pool, examples = ctx.model, ctx.pool, list(ctx.fit_examples)
        init = cfg.get("init", "randn")
        init = init if isinstance(init, (str, int, float)) else (dict(init) if hasattr(init, "keys") else list(init))
        softmax = bool(cfg.get("softmax", True))
        prompts = lambda batch: [ctx.prompt(e) for e in batch]  # noqa: E731
        targets = lambda batch: [e.train_target for e in batch]  # noqa: E731
        with Timer() as timer:
            logits = initial_logits(init, pool.names, pool.module_names, ctx.seed)
            with cat_attached(lm, pool, logits, softmax) as weights:
                initial_w = weights.table(pool.names)
                fit_loss = functools.partial(_fit_loss, lm, examples, prompts, targets, tc.max_len)
                initial = fit_loss()

                def objective(batch: list[Example]) -> torch.Tensor:
                    return lm.loss(prompts(batch), targets(batch), max_len=tc.max_len)

                result = train_gates([weights.logits], examples, objective, tc, ctx.seed, desc=f"fit cat {ctx.unit}")
                final = fit_loss()
                table = weights.table(pool.names)
                trained = weights.logits.numel()
            merged = cat_merge(list(pool), {m: [table[m][n] for n in pool.names] for m in pool.module_names})
        merged.metadata = {"method": "cat", "experts": pool.names, "weights": table, "softmax": softmax}
        mean = {n: sum(table[m][n] for m in table) / len(table) for n in pool.names}
        info = {**info_common(tc, initial, final, result.history), "train_seconds": result.seconds,
                "epochs": tc.epochs, "steps_config": tc.steps, "softmax": softmax,
                "init": init if not isinstance(init, str) else f"{init} (seed {ctx.seed})",
                "weights": table, "initial_weights": initial_w, "mean_weights": mean,
                "rank": {m: mod.rank for m, mod in merged.modules.items()}}
        report = FitReport(examples=len(examples), steps=result.steps, seconds=timer.seconds,
                           trained_params=trained, info=info)
        with lm.adapter_applied(merged):
            yield Composed(lm, report, "", merged)


@torch.no_grad()
def _fit_loss(lm, examples: Sequence[Example], prompts, targets, max_len: int) -> float | None:
    """Mean target-token loss on the fit examples (None without examples)."""
    if not examples:
        return None
    return float(lm.loss(prompts(examples), targets(examples), max_len=max_len))


# ----------------------------------------------------------------------------------------- perf
def synthetic_layer(d: int = 4096, n: int = 8, rank: int = 16, ranks: Sequence[int] | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> tuple[StackedLoraLinear, CatWeights, LoraModule]:
    """A d×d base linear with N random experts (ranks `ranks`, or `rank` each, scale 2) as the stacked layer CAT
    trains through, random CAT weights w = softmax(θ), and the composed LoRA of rank Σ r_i it yields."""
    g = torch.Generator().manual_seed(seed)
    ranks = list(ranks) if ranks is not None else [rank] * n
    base = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    base = base.to(device, dtype)
    experts = [LoraModule(torch.randn(r, d, generator=g) / math.sqrt(d), torch.randn(d, r, generator=g) / r, 2.0)
               for r in ranks]
    layer = StackedLoraLinear(base, [e.to(device, dtype) for e in experts], path="layer")
    weights = CatWeights(["layer"], torch.randn(1, len(ranks), generator=g)).to(device)
    layer.gate_fn = functools.partial(cat_gates, weights)
    w = weights.of("layer").detach().tolist()
    A = torch.cat([e.A for e in experts], dim=0)
    B = torch.cat([wi * e.scale * e.B for wi, e in zip(w, experts)], dim=1)
    return layer, weights, LoraModule(A.to(device, dtype), B.to(device, dtype), 1.0)


def cat_lora_forward(x: torch.Tensor, weight: torch.Tensor, lora: LoraModule) -> torch.Tensor:
    """The composed CAT layer unmerged: ``W x + B' (A' x)`` with the rank-Σ r_i LoRA (scale 1)."""
    return F.linear(x, weight) + F.linear(F.linear(x, lora.A), lora.B)


def perf_forwards(d: int = 4096, n: int = 8, rank: int = 16, tokens: int = 512,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> dict[str, Callable[[], torch.Tensor]]:
    """Forwards of one synthetic CAT layer (d × d, N experts of rank `rank`) on an input (1, tokens, d), for
    ``common.time_fn`` (cost per token = time / tokens):

    - ``base``: ``W x``;
    - ``cat_train``: the stacked layer CAT trains through, its gates w_l = softmax(θ_l) recomputed from the
      learnable logits every call (run it under grad to time a training forward);
    - ``cat_lora``: the composed LoRA of rank N·r unmerged, ``W x + B'(A' x)`` (`cat_lora_forward`);
    - ``cat_folded``: the composed LoRA folded into W, what the benchmark evaluates (``(W + B'A') x``: the base
      layer's cost; W' built once, outside the timed call).
    """
    layer, weights, lora = synthetic_layer(d, n, rank, device=device, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, tokens, d, generator=g).to(device, dtype)
    W = layer.base.weight
    folded = (W.float() + lora.B.float() @ lora.A.float()).to(dtype)
    return {
        "base": lambda: F.linear(x, W),
        "cat_train": lambda: layer(x),
        "cat_lora": lambda: cat_lora_forward(x, W, lora),
        "cat_folded": lambda: F.linear(x, folded),
    }
