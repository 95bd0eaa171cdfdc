"""Spectral building blocks shared by the SVD-based merges (KnOTS, Core Space, TSV-M, Iso-C / Iso-CTS): thin SVDs
from LoRA factors, which singular directions count as nonzero, the closest orthonormal matrix, the official TIES of
the KnOTS / Core Space code, and the config checks they share."""

from __future__ import annotations

import math

import torch

from bench.errors import ConfigError
from methods.ops.merge_ops import disjoint_merge_


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


def nonzero(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Mask of the descending singular values ``s (…, k)`` of a matrix of `shape` above ``σ_max · max(shape) · ε``
    (`torch.linalg.matrix_rank`'s rule): the directions the matrix has, not its arbitrary null space."""
    return s > s[..., :1] * (max(shape) * torch.finfo(s.dtype).eps)


def rank_tolerance(A: torch.Tensor, B: torch.Tensor) -> float:
    """The singular value below which a direction counts as zero in this module: ``max(d_out, d_in) · ε ·
    Σ_i ‖B_i‖_F ‖A_i‖_F`` (float64 ε), ε times an upper bound on the norm of every matrix a merge decomposes
    (each ``B_i A_i``, their sum, their projections), as `torch.linalg.matrix_rank` scales its default."""
    norms = torch.linalg.matrix_norm(B) * torch.linalg.matrix_norm(A)
    return max(B.shape[1], A.shape[2]) * torch.finfo(torch.float64).eps * norms.sum().item()


def leading(S: torch.Tensor, tol: float, k: int) -> torch.Tensor:
    """Mask of each row's top ``min(k, rank)`` singular values in descending ``S (N, r)``, rank counting those
    above `tol`."""
    rank = (S > tol).sum(-1, keepdim=True)
    return torch.arange(S.shape[-1], device=S.device) < rank.clamp(max=k)


def lowrank_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U diag(S) Vh`` of each ``B_i A_i`` from ``A (N, r, d_in)`` and ``B (N, d_out, r)``: QR of
    ``B_i`` and ``A_iᵀ`` and an SVD of the ``r × r`` core, never the dense product. Singular values descending."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.mT)
    u, s, vh = torch.linalg.svd(rb @ ra.mT)
    return qb @ u, s, vh @ qa.mT


def polar(M: torch.Tensor) -> torch.Tensor:
    """The closest matrix to M with orthonormal columns (rows, if M is wide): ``P Qᵀ`` from ``M = P Σ Qᵀ``."""
    p, _, qh = torch.linalg.svd(M, full_matrices=False)
    return p @ qh


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
