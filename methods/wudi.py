"""`method=wudi`: WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It").

Per module, the merged update τ_m minimises the interference the task vectors τ_i = w_i s_i B_i A_i predict
for their own inputs (the rows of τ_i span them):

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²,

by Adam (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay) for 300 steps from the task-arithmetic sum
Σ_i τ_i, returned unscaled (scaling_coef 1). This is the official code, nathanielyvo/WUDI-Merging at commit
dc3cd1204a68d1930a32da11c5cddb0cbd7410bb, ``vit/wudi_main.py`` (`get_redundant_task_vector`, `--iter`
default 300 in ``vit/args.py``), which optimises every linear weight (all LoRA modules are linear); FusionBench's
`wudi_merging` (tanganke/fusion_bench) is the same. Deterministic: no random draws.

Only thin factors are ever multiplied. Optimising the offset δ = τ_m − Σ_j τ_j (Adam's iterates do not depend
on where they start), with ``A_cat (Nr × d_in)`` the stacked A_i, ``M_i = B_iᵀB_i / ‖τ_i‖²`` and
``Y_i = (τ_m − τ_i) A_iᵀ = δ A_iᵀ + Σ_{j≠i} B_j (A_j A_iᵀ)`` (the cross terms alone: exactly 0 for one expert):

    L = Σ_i tr(Y_i M_i Y_iᵀ),    ∇L = 2 Σ_i Y_i M_i A_i = 2 Y Ã,    Ã = blockdiag(M_i) A_cat,

two GEMMs of d_out·d_in·Nr per step; where d_in < 2·Nr the Gram form ∇L = δ (2 A_catᵀ Ã) + ∇L(0), one GEMM of
d_out·d_in², is cheaper and used instead. Both are exact rewritings of the dense gradient.

Deliberate choices beyond the official code: weights scale the task vectors (τ_i = w_i s_i B_i A_i; the
default 1 each is the official objective); a zero task vector (weight 0, or an all-zero LoRA) has no term
(the official code divides 0 by 0); `dtype` sets the precision of the optimisation (official: float32).
``fold: true`` (default) adds τ_m to the base weights as the official code does; ``fold: false`` keeps it as a
LoRA of `rank` (truncated SVD; null = max r_i). The report counts Adam steps over all modules and records the
summed objective at the start and the end and ``norm_vs_sum``, ‖τ_m‖ / ‖Σ_i τ_i‖ over all modules (how far the
optimisation moved the merge from task arithmetic's scale).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from omegaconf import DictConfig

from bench.errors import ConfigError
from bench.registry import register_method
from methods.base import Composed, FitContext, Timer
from methods.ops.merge_ops import ModuleMergeMethod, compose_deltas

DTYPES = {"float32": torch.float32, "float64": torch.float64}
STEPS, LR, DTYPE = 300, 1e-5, "float32"  # the defaults: the official code's


class Interference:
    """WUDI's objective and gradient for one module as functions of δ = τ_m − Σ_i τ_i, from the factors only.

    `A (N, r, d_in)` and `B (N, d_out, r)` (zero-padded ranks; τ_i = B_i A_i, weights already in B)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        n, r, d_in = A.shape
        self.shape = (n, r)
        self.A = A.reshape(n * r, d_in)
        self.B = B.transpose(0, 1).reshape(B.shape[1], n * r)
        gram_a = self.A @ self.A.T  # (Nr, Nr): blocks A_j A_iᵀ
        blocks = torch.kron(torch.eye(n, device=A.device), torch.ones(r, r, device=A.device)).bool()
        gram_b = B.transpose(1, 2) @ B  # (N, r, r): B_iᵀ B_i
        norms = (gram_b * gram_a[blocks].view(n, r, r)).sum((1, 2))  # ‖B_i A_i‖_F²
        self.M = gram_b * torch.where(norms > 0, 1 / norms, torch.zeros_like(norms)).view(n, 1, 1)  # (N, r, r)
        self.Y0 = self.B @ gram_a.masked_fill(blocks, 0)  # Y at δ = 0: Σ_{j≠i} B_j A_j A_iᵀ, (d_out, Nr)
        self.At = (2 * self.M @ A).reshape(n * r, d_in)  # 2 Ã
        self.gram = d_in < 2 * n * r
        if self.gram:
            self.G, self.g0 = self.A.T @ self.At, self.Y0 @ self.At

    def start(self) -> torch.Tensor:
        """The task-arithmetic sum Σ_i τ_i, where δ = 0."""
        return self.B @ self.A

    def residual(self, delta: torch.Tensor) -> torch.Tensor:
        """Y = [(τ_m − τ_i) A_iᵀ]_i, (d_out, Nr)."""
        return torch.addmm(self.Y0, delta, self.A.T)

    def objective(self, delta: torch.Tensor) -> torch.Tensor:
        y = self.residual(delta).view(-1, *self.shape)
        return (torch.einsum("oir,irs->ois", y, self.M) * y).sum()

    def gradient(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.g0, delta, self.G) if self.gram else self.residual(delta) @ self.At


def wudi(A: torch.Tensor, B: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, float, float, float]:
    """The merged update τ_m of one module after `steps` Adam steps from the sum, with L at the start and end and
    the sum's Frobenius norm."""
    interference = Interference(A, B)
    delta = torch.zeros(B.shape[1], A.shape[2], dtype=A.dtype, device=A.device)
    start = interference.objective(delta).item()
    optimizer = torch.optim.Adam([delta], lr=lr, weight_decay=0, fused=delta.is_cuda)  # fused: one kernel a step
    for _ in range(steps):
        delta.grad = interference.gradient(delta)
        optimizer.step()
    total = interference.start()
    total_norm = total.norm().item()
    return total.add_(delta), start, interference.objective(delta).item(), total_norm


@register_method("wudi")
class Wudi(ModuleMergeMethod):
    """Config: ``steps`` (300), ``lr`` (1e-5), ``dtype`` (float32) and the `ModuleMergeMethod` keys."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        # per module merged: objective at the start and end, norms of the task-arithmetic sum and of τ_m
        self.trace: list[tuple[float, float, float, float]] = []

    def check_config(self) -> None:
        super().check_config()
        steps = self.cfg.get("steps", STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"method.steps={steps!r}: must be an integer ≥ 0")
        lr = self.cfg.get("lr", LR)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"method.lr={lr!r}: must be a finite number > 0")
        if self.cfg.get("dtype", DTYPE) not in DTYPES:
            raise ConfigError(f"method.dtype={self.cfg.get('dtype')!r}: must be one of {sorted(DTYPES)}")

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        dtype = DTYPES[self.cfg.get("dtype", DTYPE)]
        B = B * weights.view(-1, 1, 1)
        steps, lr = self.cfg.get("steps", STEPS), float(self.cfg.get("lr", LR))
        merged, start, end, sum_norm = wudi(A.to(dtype), B.to(dtype), steps, lr)
        self.trace.append((start, end, sum_norm, merged.norm().item()))
        return merged.to(torch.float64)

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        device = getattr(ctx.model, "device", None)
        self.trace = []
        with Timer() as timer:
            weights = self.weights(ctx.pool)
            deltas = self.merge(list(ctx.pool), weights, ctx.seed, device)
        sum_sq, merged_sq = sum(t[2] ** 2 for t in self.trace), sum(t[3] ** 2 for t in self.trace)
        info = {"weights": weights, "objective_start": sum(t[0] for t in self.trace),
                "objective_end": sum(t[1] for t in self.trace),
                "norm_vs_sum": math.sqrt(merged_sq / sum_sq) if sum_sq > 0 else None}
        for composed in compose_deltas(self, ctx, deltas, timer.seconds, info):
            composed.report.steps = len(self.trace) * self.cfg.get("steps", STEPS)
            yield composed
