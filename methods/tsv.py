"""`method=tsv`: Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025), of ``Δ_i = w_i s_i B_i A_i``.

Per module, as the official `compute_and_sum_svd_mem_reduction` (AntoAndGar/task_singular_vectors@a6c9718,
``src/utils/TSVM_utils.py``): each task keeps its top ``k = ⌊min(d_out, d_in) / N⌋`` singular triplets
``U_i S_i V_iᵀ``; the blocks are concatenated, ``U = [U_1 … U_N]``, ``S = diag(S_1, …, S_N)``,
``V = [V_1 … V_N]``; U and V are replaced by their closest orthogonal matrices (orthogonal Procrustes:
``P Qᵀ`` from the thin SVD ``P Σ Qᵀ``) and ``ΔW = α · U⊥ S V⊥ᵀ``.

LoRA updates are low-rank, so ``k`` can exceed rank Δ_i; the official code then keeps singular vectors of zero
singular values, which are arbitrary and change the orthogonalization of the others. Here ``k_i = min(k,
rank Δ_i)`` (singular values above `rank_tolerance`): the official k wherever rank Δ_i ≥ k (full-rank
updates, the official setting). With ``N·r ≤ min(d)`` every triplet is kept and only the decorrelation acts.
One expert gives ``α Δ_1`` back.
Each weight scales its update before the SVDs (as FusionBench's per-task ``alpha`` list); null = 1 each.
α = 1 (FusionBench's default; the official code picks α on validation data in (0, 3]).

The SVDs never form a dense matrix: ``Δ_i = (Q_B R_B)(Q_A R_A)ᵀ`` by QR of the factors and one SVD of the
small core ``R_B R_Aᵀ`` (`lowrank_svd`). The helpers here are shared with `methods.iso`.
"""

from __future__ import annotations

import torch

from bench.registry import register_method
from methods.ops.merge_ops import ModuleMergeMethod
from methods.ops.spectral import check_alpha, leading, lowrank_svd, polar, rank_tolerance


@register_method("tsv")
class TaskSingularVectors(ModuleMergeMethod):
    """TSV-M; config ``alpha`` (+ the `ModuleMergeMethod` keys)."""

    def check_config(self) -> None:
        super().check_config()
        self.alpha = check_alpha(self.cfg.get("alpha", 1.0))

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        d_out, d_in = B.shape[1], A.shape[2]
        B = B * weights.view(-1, 1, 1)
        U, S, Vh = lowrank_svd(A, B)
        keep = leading(S, rank_tolerance(A, B), min(d_out, d_in) // len(weights))
        if not keep.any():
            return B.new_zeros(d_out, d_in)
        u, s, vh = U.mT[keep].T, S[keep], Vh[keep]  # the kept triplets, task after task: (d_out, M), (M,), (M, d_in)
        return self.alpha * (polar(u) * s) @ polar(vh)
