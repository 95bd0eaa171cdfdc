"""`method=knots`: KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS").

Per module, the thin SVD of the updates side by side, ``[Δ_1 … Δ_N] = U Σ [V_1ᵀ … V_Nᵀ]`` (``Δ_i = s_i B_i A_i``),
gives each task the representation ``R_i = Σ V_iᵀ`` (k × d_in) in the shared basis U; the R_i are merged and
mapped back, ``ΔW = α · U · merge(R_1 … R_N)``. `merger`:

- ``ties`` (KnOTS-TIES): `ties_merge` on the R_i (trim each to its top `density`, elect the sign of the sum,
  weighted mean of the agreeing entries);
- ``linear`` (KnOTS-TA): ``Σ w_i R_i``, i.e. exactly ``Σ w_i Δ_i``.

As the official code (gstoica27/KnOTS@baa35e8, ``task_merger.SVDMerger``, ``masking_ops``): TIES acts on the
rows of ΣVᵀ, α is its ``scaling_coeffs`` (tuned on validation data there: 0.5-0.6; here 1); each expert's weight
scales it in the mean (the official code has one coefficient for all). Deviations: the official code trims each
task over all its modules at once, here per module (as peft's TIES); it drops the components with σ ≤ 1e-5
(absolute), here those below the numerical rank (`nonzero`: the same components unless a real σ is below 1e-5).
Computed from the factors: ``[Δ_1 … Δ_N] = Q_B R_B · blockdiag(R_iᵀ Q_iᵀ)`` (QR of ``[s_1B_1 … s_NB_N]`` and of
each ``A_iᵀ = Q_i R_i``), one SVD of the ``N·r``-sized core ``R_B blockdiag(R_iᵀ)``; nothing d_out × N·d_in is
formed. `ties_merge` and `nonzero` are shared with `methods.core_space`.
"""

from __future__ import annotations

import math

import torch

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.merge_ops import ModuleMergeMethod, check_density, disjoint_merge_, weighted_sum

MERGERS = ("ties", "linear")


def nonzero(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Mask of the descending singular values ``s (…, k)`` of a matrix of `shape` above ``σ_max · max(shape) · ε``
    (`torch.linalg.matrix_rank`'s rule): the directions the matrix has, not its arbitrary null space."""
    return s > s[..., :1] * (max(shape) * torch.finfo(s.dtype).eps)


def ties_merge(stacked: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES as the official KnOTS and Core Space code (`topk_values_mask`, `resolve_sign` by the sum of values,
    `disjoint_merge` 'mean') on ``stacked (N, …)``: per expert keep ``|x| ≥`` the ``(⌊density·numel⌋ + 1)``-th
    largest magnitude (its ``kthvalue``, one entry more than peft's top-k; all at density 1), then
    `disjoint_merge_`: the weighted sum of the entries whose sign is that of the trimmed sum, over their count
    (an exactly zero sum elects +, the official code the majority sign: only exact cancellations differ).
    Consumes `stacked`."""
    n, shape = stacked.shape[0], stacked.shape[1:]
    rows = stacked.reshape(n, -1)
    if density < 1.0:
        magnitudes = rows.abs()
        d = rows.shape[1]
        tau = magnitudes.kthvalue(d - int(d * density), dim=1, keepdim=True).values
        rows.mul_(magnitudes >= tau)
        del magnitudes
    return disjoint_merge_(rows, weights, "total").view(shape)


def knots_representations(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U (d_out, k)`` and ``R (N, k, d_in)``, ``R_i = Σ V_iᵀ``, of ``[B_1A_1 … B_NA_N] = U [R_1 … R_N]`` (thin
    SVD, nonzero components only) from ``A (N, r, d_in)`` and ``B (N, d_out, r)``."""
    n, d_out, r = B.shape
    q_b, r_b = torch.linalg.qr(B.permute(1, 0, 2).reshape(d_out, n * r))  # [B_1 … B_N] = Q_B R_B
    q_a, r_a = torch.linalg.qr(A.mT)  # A_iᵀ = Q_i R_i: (N, d_in, p), (N, p, r)
    p = r_a.shape[1]
    core = (r_b.reshape(-1, n, r).transpose(0, 1) @ r_a.mT).transpose(0, 1).reshape(-1, n * p)  # [R_B,i R_iᵀ]_i
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = nonzero(s, (d_out, n * A.shape[2]))
    u, s, vh = u[:, keep], s[keep], vh[keep]
    reps = (s[:, None] * vh).view(-1, n, p).transpose(0, 1) @ q_a.mT  # Σ V_iᵀ = Σ (V_core)_iᵀ Q_iᵀ
    return q_b @ u, reps


def check_alpha(value) -> float:
    """`method.alpha` as a positive finite float, or a ConfigError naming it."""
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method.alpha={value!r}: must be a positive number") from None
    if isinstance(value, bool) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"method.alpha={value!r}: must be a positive number")
    return alpha


def check_merger(value, mergers: tuple[str, ...]) -> str:
    """`method.merger` if it is one of `mergers`, else a ConfigError naming it."""
    if value not in mergers:
        raise ConfigError(f"method.merger={value!r}: must be one of {list(mergers)}")
    return value


@register_method("knots")
class Knots(ModuleMergeMethod):
    """KnOTS; config ``merger``, ``density`` (ties), ``alpha`` (+ the `ModuleMergeMethod` keys)."""

    def check_config(self) -> None:
        super().check_config()
        self.merger = check_merger(self.cfg.get("merger", "ties"), MERGERS)
        self.density = check_density(self.cfg.get("density", 0.2))
        self.alpha = check_alpha(self.cfg.get("alpha", 1.0))

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        U, reps = knots_representations(A, B)
        if reps.shape[1] == 0:
            return B.new_zeros(B.shape[1], A.shape[2])
        merged = ties_merge(reps, weights, self.density) if self.merger == "ties" else weighted_sum(reps, weights)
        return self.alpha * (U @ merged)
