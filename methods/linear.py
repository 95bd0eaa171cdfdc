"""`method=linear`: linear arithmetic, ``ΔW = λ · Σ_i w_i s_i B_i A_i`` (DESIGN §4).

Computed exactly as one concatenated LoRA of rank Σ r_i: ``A' = [A_1; …; A_N]``,
``B' = [λ w_1 s_1 B_1, …, λ w_N s_N B_N]`` with scale 1, so ``B' A' = λ Σ w_i s_i B_i A_i`` with no cross
terms (unlike combining A and B separately). Options: `weights` (default uniform 1/N: normalized linear
arithmetic, MoLE's NLA baseline), `normalize` (divide weights by their sum), `lambda` (task-arithmetic
scale), `fold` (add ΔW into the dense weights instead of keeping a LoRA) and `rank` (re-factorize each
module's exact ΔW to rank k by truncated SVD).

`combination: peft_compat` instead reproduces peft's ``add_weighted_adapter(combination_type="linear")``
(`peft_linear_merge`): A and B are combined separately, ``A' = Σ_i sgn(w_i s_i) √|w_i s_i| A_i``,
``B' = Σ_i √|w_i s_i| B_i``, so ``B'A'`` carries the cross terms ``B_i A_j`` and is *not* the weighted sum;
it needs equal ranks per module. Its rows are labelled variant "peft_compat (not exact)".
"""

from __future__ import annotations

from typing import Iterator, Sequence

import math

import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer


def concat_merge(adapters: Sequence[LoraAdapter], weights: Sequence[float], name: str = "linear") -> LoraAdapter:
    """The exact weighted sum of `adapters` as one LoRA of rank Σ r_i (scale 1)."""
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    modules = {}
    for module in adapters[0].modules:
        parts = [a.modules[module] for a in adapters]
        A = torch.cat([m.A for m in parts], dim=0)
        B = torch.cat([float(w) * m.scale * m.B for w, m in zip(weights, parts)], dim=1)
        modules[module] = LoraModule(A, B, 1.0)
    return LoraAdapter(name, adapters[0].base_model, modules, task_type=adapters[0].task_type)


def peft_linear_merge(adapters: Sequence[LoraAdapter], weights: Sequence[float], name: str = "linear") -> LoraAdapter:
    """peft's ``add_weighted_adapter(combination_type="linear")``, reproduced op for op (not the exact sum).

    Per module, with ``c_i = w_i s_i``: ``A' = Σ sgn(c_i) √|c_i| A_i``, ``B' = Σ √|c_i| B_i`` (weights as a
    float32 tensor, as peft builds them); the new adapter has ``r = lora_alpha`` so its scale is 1, or
    ``√r`` when the first adapter uses rsLoRA (peft keeps that flag). Raises ConfigError on unequal ranks.
    """
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    modules = {}
    for module in adapters[0].modules:
        parts = [a.modules[module] for a in adapters]
        ranks = {a.name: m.rank for a, m in zip(adapters, parts)}
        if len(set(ranks.values())) != 1:
            raise ConfigError(
                f"method.combination=peft_compat needs equal ranks (peft's linear combination); {module} has "
                f"ranks {ranks}: use combination=exact"
            )
        c = [float(w) * m.scale for w, m in zip(weights, parts)]
        w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in c])
        w_b = torch.tensor([math.sqrt(abs(x)) for x in c])
        A = (torch.stack([m.A for m in parts]) * w_a.to(parts[0].A.device).view(-1, 1, 1)).sum(0)
        B = (torch.stack([m.B for m in parts]) * w_b.to(parts[0].B.device).view(-1, 1, 1)).sum(0)
        modules[module] = LoraModule(A.to(parts[0].A.dtype), B.to(parts[0].B.dtype), 1.0)
    rslora = adapters[0].use_rslora
    if rslora:
        scale = math.sqrt(max(adapters[0].ranks))
        modules = {k: LoraModule(m.A, m.B, scale) for k, m in modules.items()}
    return LoraAdapter(name, adapters[0].base_model, modules, use_rslora=rslora, task_type=adapters[0].task_type)


def dense_deltas(adapter: LoraAdapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Module path -> ``scale · B @ A``."""
    return {name: m.delta(dtype) for name, m in adapter.modules.items()}


def svd_refactor(adapter: LoraAdapter, rank: int, name: str | None = None) -> LoraAdapter:
    """Each module's ΔW re-factorized to its best rank-`rank` approximation (Eckart–Young)."""
    if rank < 1:
        raise ConfigError(f"rank={rank}: must be ≥ 1")
    modules = {}
    for module, m in adapter.modules.items():
        # ΔW = B A with B (d_out × R), A (R × d_in): SVD through the small factors (QR of each) avoids
        # forming the dense matrix: B = Qb Rb, Aᵀ = Qa Ra, ΔW = Qb (Rb Raᵀ) Qaᵀ.
        qb, rb = torch.linalg.qr(m.scale * m.B.double())
        qa, ra = torch.linalg.qr(m.A.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        k = min(rank, s.numel())
        B = (qb @ u[:, :k]) * s[:k]
        A = vh[:k] @ qa.T
        modules[module] = LoraModule(A.to(m.A.dtype), B.to(m.B.dtype), 1.0)
    return LoraAdapter(name or f"{adapter.name}-svd{rank}", adapter.base_model, modules, task_type=adapter.task_type)


def resolve_weights(cfg_weights, pool: ExpertPool, normalize: bool) -> list[float]:
    """Weights as a list in pool order: None (uniform 1/N), a list, or a {expert name: weight} mapping."""
    n = len(pool)
    if cfg_weights is None:
        weights = [1.0 / n] * n
    elif hasattr(cfg_weights, "keys"):
        unknown = set(cfg_weights) - set(pool.names)
        if unknown:
            raise ConfigError(f"method.weights names unknown experts {sorted(unknown)}; pool: {pool.names}")
        weights = [float(cfg_weights.get(name, 0.0)) for name in pool.names]
    else:
        weights = [float(w) for w in cfg_weights]
        if len(weights) != n:
            raise ConfigError(f"method.weights has {len(weights)} values for a pool of {n} experts")
    if normalize:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ConfigError("method.normalize=true but the weights sum to 0")
        weights = [w / total for w in weights]
    return weights


COMBINATIONS = ("exact", "peft_compat")


@register_method("linear")
class LinearArithmetic(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return False  # no fit examples, no sampling, no random draws

    def check_config(self) -> None:
        rank = self.cfg.get("rank")
        if rank is not None and int(rank) < 1:
            raise ConfigError(f"method.rank={rank}: must be ≥ 1 (or null to keep the exact rank Σ r_i)")
        combination = self.cfg.get("combination", "exact")
        if combination not in COMBINATIONS:
            raise ConfigError(f"method.combination={combination!r}: must be one of {list(COMBINATIONS)}")

    def merge(self, pool: ExpertPool) -> LoraAdapter:
        weights = resolve_weights(self.cfg.get("weights"), pool, bool(self.cfg.get("normalize", False)))
        lam = float(self.cfg.get("lambda", 1.0))
        combination = self.cfg.get("combination", "exact")
        combine = peft_linear_merge if combination == "peft_compat" else concat_merge
        merged = combine(list(pool), [lam * w for w in weights], name="linear")
        rank = self.cfg.get("rank")
        if rank is not None:
            merged = svd_refactor(merged, int(rank), name="linear")
        merged.metadata = {"method": "linear", "experts": pool.names, "weights": weights, "lambda": lam,
                           "combination": combination}
        return merged

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        with Timer() as timer:
            merged = self.merge(ctx.pool)
        exact = self.cfg.get("combination", "exact") == "exact"
        report = FitReport(seconds=timer.seconds, info={"weights": merged.metadata.get("weights"), "exact": exact})
        variant = "" if exact else "peft_compat (not exact)"
        if self.cfg.get("fold", False):
            with ctx.model.deltas_folded(dense_deltas(merged)):
                yield Composed(ctx.model, report, variant, merged)
        else:
            with ctx.model.adapter_applied(merged):
                yield Composed(ctx.model, report, variant, merged)
