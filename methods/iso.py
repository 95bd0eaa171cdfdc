"""`method=iso_c` and `method=iso_cts`: isotropic merging (Marczak et al., ICML 2025) of ``Δ_i = w_i s_i B_i A_i``.

As the official `iso_c` / `iso_cts` (danielm1405/iso-merging@d34010a, ``src/utils/iso.py``), per module:

- Iso-C: the task-arithmetic sum ``Δ_TA = Σ_i Δ_i = U S Vᵀ`` with its spectrum flattened,
  ``ΔW = α · σ̄ · U Vᵀ``, σ̄ the mean singular value;
- Iso-CTS: of the ``D`` directions, the common subspace keeps Δ_TA's top ``c`` (``c = ⌊f·D⌋``, then moved
  so that ``N`` divides ``D − c``: ``n = round((D − c) / N)``, ``c = D − N n``; f = `common_space_fraction`);
  each task adds the top ``n`` singular triplets of ``Δ_i − U_c U_cᵀ Δ_i`` (its update off the common
  subspace); the concatenated U and V are replaced by their closest orthogonal matrices (`methods.tsv.polar`)
  and ``ΔW = α · σ̄ · U⊥ V⊥ᵀ``, σ̄ the mean of all the collected singular values.

Where the official code counts ``D = min(d_out, d_in)`` directions, a LoRA sum has only ``R = rank Δ_TA``;
the other singular vectors belong to zero singular values and are arbitrary (with them Iso-C's σ̄ would
shrink by R / min(d) and U Vᵀ would gain arbitrary full-rank directions, and Iso-CTS's common subspace would
swallow every task). So here ``D = R`` (`methods.tsv.rank_tolerance`): U, V and σ̄ are over Δ_TA's nonzero
singular values, and a task contributes at most as many directions as its projected update has. For
full-rank updates, the official setting, D is the official min(d_out, d_in). One more guard: ``n ≤ ⌊D/N⌋``
(the official formula can round n up past it, leaving c < 0). Iso-CTS with one expert equals Iso-C: the
expert's own subspace with a flat spectrum (not the expert). Weights scale each update first (null = 1
each: Δ_TA is the official sum). α = 1 (FusionBench's default; the official code picks α on validation
data in (0, 3]).
"""

from __future__ import annotations

import torch

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.merge_ops import ModuleMergeMethod
from methods.ops.spectral import check_alpha, leading, lowrank_svd, polar, rank_tolerance


def task_arithmetic_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``Σ_i B_i A_i``, computed as one LoRA of rank N·r (the factors concatenated)."""
    n, d_out, r = B.shape
    U, S, Vh = lowrank_svd(A.reshape(1, n * r, -1), B.permute(1, 0, 2).reshape(1, d_out, n * r))
    return U[0], S[0], Vh[0]


def split_space(D: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """``(c, n)``: the common subspace's size and each task's, ``c + N n = D`` (the official rounding)."""
    n = min(round((D - int(D * fraction)) / n_tasks), D // n_tasks)
    return D - n_tasks * n, n


class IsotropicMerge(ModuleMergeMethod):
    """Iso-C / Iso-CTS; config ``alpha`` (+ ``common_space_fraction`` for Iso-CTS, + the `ModuleMergeMethod` keys)."""

    def check_config(self) -> None:
        super().check_config()
        self.alpha = check_alpha(self.cfg.get("alpha", 1.0))

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        B = B * weights.view(-1, 1, 1)
        tol = rank_tolerance(A, B)
        U, S, Vh = task_arithmetic_svd(A, B)
        R = int((S > tol).sum())
        if R == 0:
            return B.new_zeros(B.shape[1], A.shape[2])
        u, s, vh = self.subspace(A, B, U[:, :R], S[:R], Vh[:R], tol)
        return self.alpha * s.mean() * (u @ vh)

    def subspace(self, A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Orthonormal ``U (d_out, D)``, ``Vh (D, d_in)`` and the D singular values to average, from Δ_TA's
        nonzero singular triplets ``U S Vh``."""
        raise NotImplementedError


@register_method("iso_c")
class IsoC(IsotropicMerge):
    def subspace(self, A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return U, S, Vh


@register_method("iso_cts")
class IsoCTS(IsotropicMerge):
    def check_config(self) -> None:
        super().check_config()
        fraction = self.cfg.get("common_space_fraction", 0.8)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"method.common_space_fraction={fraction!r}: must be a number in [0, 1]")
        self.fraction = float(fraction)

    def subspace(self, A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                 tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, n = split_space(S.numel(), B.shape[0], self.fraction)
        Uc = U[:, :c]
        Ut, St, Vt = lowrank_svd(A, B - Uc @ (Uc.mT @ B))  # each update off the common subspace
        keep = leading(St, tol, n)
        u = torch.cat([Ut.mT[keep].T, Uc], dim=1)
        vh = torch.cat([Vt[keep], Vh[:c]])
        return polar(u), torch.cat([St[keep], S[:c]]), polar(vh)
