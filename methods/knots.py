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

import torch

from bench.registry import register_method
from methods.ops.merge_ops import ModuleMergeMethod, check_density, weighted_sum
from methods.ops.spectral import check_alpha, check_merger, nonzero, ties_merge

MERGERS = ("ties", "linear")


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
