"""`method=core_space`: Core Space merging (Panariello et al., NeurIPS 2025, "Accurate and Efficient Low-Rank Model
Merging in Core Space").

Per module, reference bases from the stacked factors: ``U_B``, the left singular vectors of ``[s_1B_1 … s_NB_N]``
(d_out × Σr), and ``V_A``, the right singular vectors of ``[A_1; …; A_N]`` (Σr × d_in); each task's core matrix
``M_i = U_Bᵀ s_iB_i A_i V_A`` (Σr × Σr when Σr ≤ d_out, d_in); the M_i merged in core space and mapped back,
``ΔW = α · U_B · merge(M_1 … M_N) · V_Aᵀ``. The bases span every B_i's columns and A_i's rows, so
``U_B M_i V_Aᵀ = Δ_i``: no information is lost, and ``linear`` gives exactly ``Σ w_i Δ_i``. `merger`:

- ``ties``: `methods.knots.ties_merge` on the M_i (official TIES: trim to the top `density`, elect sign, mean);
- ``linear``: task arithmetic, ``Σ w_i M_i``;
- ``tsv``: TSV-M, each ``w_i M_i``'s top ``⌊q/N⌋`` singular triplets (q = min core size), the stacked singular
  vectors replaced by their closest orthonormal ones (polar factors), ``P_U · diag(σ) · P_Vᵀ``.

``isotropize: true`` then sets every singular value of the merged core to their mean (Iso-C with ``linear``).

As the official code (apanariello4/core-space-merging@85176fa, ``task_merger.MatrixPerLayerMerger``:
``get_core_matrices``, ``_merge_tensors``, ``get_tsv_delta_w``, ``isotropize_matrix``; ``merging_functions.
ties_merging``); α is its ``scaling_coeffs``, applied after the merge (searched on validation data there; here 1).
Deviation: bases, TSV triplets and the isotropic mean use nonzero singular values only (`methods.knots.nonzero`),
where the official code also takes those of zero singular value, whose vectors are arbitrary: min(d, Σr) bases of
a rank-deficient stack, ⌊q/N⌋ triplets of a task of lower rank (mixed ranks), the whole spectrum of a rank-deficient
merged core (sparse TIES, TSV). Elsewhere the results are the official ones. Not ported: its DARE, DARE-TIES and
CART mergers. The bases come from a QR of each stack and an SVD of its Σr-sized R factor; TSV's per-task SVDs
from each core's rank-r factors.
"""

from __future__ import annotations

import torch

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.merge_ops import ModuleMergeMethod, check_density, weighted_sum
from methods.ops.spectral import check_alpha, check_merger, nonzero, polar, ties_merge

MERGERS = ("ties", "linear", "tsv")


def column_basis(X: torch.Tensor) -> torch.Tensor:
    """X's left singular vectors of nonzero singular value, ``(m, rank)``: ``X = Q R``, ``R = U S Vᵀ`` → ``Q U``."""
    q, r = torch.linalg.qr(X)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    return q @ u[:, nonzero(s, X.shape)]


def core_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_B (d_out, k_B)``, ``P = U_Bᵀ B (N, k_B, r)``, ``Q = A V_A (N, r, k_A)`` and ``V_A (d_in, k_A)`` from
    ``A (N, r, d_in)`` and ``B (N, d_out, r)``: the cores are ``M_i = P_i Q_i`` (zero-padded components add
    nothing to the stacks' ranges)."""
    n, d_out, r = B.shape
    U_B = column_basis(B.permute(1, 0, 2).reshape(d_out, n * r))
    V_A = column_basis(A.permute(2, 0, 1).reshape(A.shape[2], n * r))
    return U_B, U_B.mT @ B, A @ V_A, V_A


def tsv_merge(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """TSV-M (the official `get_tsv_delta_w`) of the cores ``M_i = P_i Q_i`` (N, k1, k2), nonzero triplets only.
    Each M_i's SVD comes from its rank-r factors (QR of P_i and Q_iᵀ, SVD of the r × r core)."""
    n, shape = P.shape[0], (P.shape[1], Q.shape[2])
    q_p, r_p = torch.linalg.qr(P)
    q_q, r_q = torch.linalg.qr(Q.mT)
    u, s, vh = torch.linalg.svd(r_p @ r_q.mT)
    keep = nonzero(s, shape)
    keep[:, min(shape) // n:] = False
    if not keep.any():
        return P.new_zeros(shape)
    u, vh = (q_p @ u).mT[keep].T, (vh @ q_q.mT)[keep]
    return (polar(u) * s[keep]) @ polar(vh)


def isotropize(M: torch.Tensor) -> torch.Tensor:
    """M with every nonzero singular value replaced by their mean (the official `isotropize_matrix`)."""
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    keep = nonzero(s, M.shape)
    if not keep.any():
        return M
    return s[keep].mean() * (u[:, keep] @ vh[keep])


@register_method("core_space")
class CoreSpace(ModuleMergeMethod):
    """Core Space merging; config ``merger``, ``density`` (ties), ``isotropize``, ``alpha`` (+ the
    `ModuleMergeMethod` keys)."""

    def check_config(self) -> None:
        super().check_config()
        self.merger = check_merger(self.cfg.get("merger", "ties"), MERGERS)
        self.density = check_density(self.cfg.get("density", 0.1))
        self.alpha = check_alpha(self.cfg.get("alpha", 1.0))
        self.isotropize = self.cfg.get("isotropize", False)
        if not isinstance(self.isotropize, bool):
            raise ConfigError(f"method.isotropize={self.isotropize!r}: must be true or false")

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        U_B, P, Q, V_A = core_factors(A, B)
        if P.shape[1] == 0 or Q.shape[2] == 0:
            return B.new_zeros(B.shape[1], A.shape[2])
        if self.merger == "tsv":
            merged = tsv_merge(P * weights.view(-1, 1, 1), Q)
        elif self.merger == "ties":
            merged = ties_merge(P @ Q, weights, self.density)
        else:
            merged = weighted_sum(P @ Q, weights)
        if self.isotropize:
            merged = isotropize(merged)
        return self.alpha * (U_B @ merged @ V_A.mT)
