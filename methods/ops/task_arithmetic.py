"""mergekit's generalized task arithmetic (`GTATask`), shared by `method=della` and `method=breadcrumbs`: prune each
expert's dense delta, then combine with a weighted sign consensus (``ties``) or a weighted sum (``linear``), divided
by the weights taken part when ``normalize``, times λ.

Read from arcee-ai/mergekit at commit a6e402884ba9bc30da7f23e8304a35f19485de95
(`mergekit/merge_methods/generalized_task_arithmetic.py`, `mergekit/sparsify.py`). It differs from peft's TIES
(`methods.ops.merge_ops.disjoint_merge_`): mergekit elects the sign of the *weighted* sum and divides by the
agreeing weights (or not at all), peft elects on the unweighted deltas and divides by the agreeing count.
"""

from __future__ import annotations

import math

import torch

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from methods.linear import resolve_weights
from methods.ops.merge_ops import ModuleMergeMethod, check_density, expert_deltas, weighted_sum


def l1_rescaled(deltas: torch.Tensor, masks: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per expert, ``m ⊙ Δ`` times ``‖Δ‖₁ / ‖m ⊙ Δ‖₁`` (mergekit's `rescaled_masked_tensor` with the l1 norm;
    left unscaled where either norm is below `eps`)."""
    masked = deltas * masks
    before, after = deltas.abs().sum((1, 2)), masked.abs().sum((1, 2))
    scale = torch.where((before < eps) | (after < eps), torch.ones_like(before), before / after)
    return masked.mul_(scale.view(-1, 1, 1))


def combine(deltas: torch.Tensor, weights: torch.Tensor, ties: bool, normalize: bool, lam: float) -> torch.Tensor:
    """mergekit's `GTATask` on the pruned deltas (N, d_out, d_in): ``λ Σ_i w_i Δ_i`` over the experts agreeing
    with the elected sign of ``Σ_i w_i Δ_i`` (`ties`) or over all of them, divided by the weights taken part
    when `normalize`."""
    if ties:
        w = weights.view(-1, 1, 1)
        weighted = deltas * w
        majority = (weighted.sum(0) >= 0).to(deltas.dtype).mul_(2).sub_(1)
        agree = weighted.sign() == majority
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted_sum(deltas, weights)
        divisor = weights.sum()
        divisor = divisor if divisor.abs() >= 1e-8 else torch.ones_like(divisor)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


class TaskArithmeticMerge(ModuleMergeMethod):
    """A mergekit generalized-task-arithmetic method: prune each Δ_i (`prune`), then `combine`. Config keys beyond
    `ModuleMergeMethod`'s: ``combination`` (`COMBINATIONS`, the first is the default), ``lambda``, ``rescale``
    (`RESCALES`, the first is the default) and ``normalize`` (null: `NORMALIZE_DEFAULT` of the combination)."""

    COMBINATIONS: tuple[str, ...]
    RESCALES: tuple[str, ...]
    NORMALIZE_DEFAULT: dict[str, bool]

    def combination(self) -> str:
        return self.cfg.get("combination", self.COMBINATIONS[0])

    def rescale(self) -> str:
        return self.cfg.get("rescale", self.RESCALES[0])

    def normalize(self) -> bool:
        value = self.cfg.get("normalize")
        return self.NORMALIZE_DEFAULT[self.combination()] if value is None else value

    def lam(self) -> float:
        return float(self.cfg.get("lambda", 1.0))

    def density(self) -> float:
        return check_density(self.cfg.get("density", 1.0))

    def check_config(self) -> None:
        super().check_config()
        if self.combination() not in self.COMBINATIONS:
            raise ConfigError(f"method.combination={self.combination()!r}: must be one of {list(self.COMBINATIONS)}")
        if self.rescale() not in self.RESCALES:
            raise ConfigError(f"method.rescale={self.rescale()!r}: must be one of {list(self.RESCALES)}")
        normalize = self.cfg.get("normalize")
        if normalize is not None and not isinstance(normalize, bool):
            raise ConfigError(f"method.normalize={normalize!r}: must be true, false or null")
        lam = self.cfg.get("lambda", 1.0)
        try:
            finite = math.isfinite(float(lam))
        except (TypeError, ValueError):
            finite = False
        if isinstance(lam, bool) or not finite:
            raise ConfigError(f"method.lambda={lam!r}: must be a finite number")
        self.density()

    def weights(self, pool: ExpertPool) -> list[float]:
        """The configured weights (null: 1 each), never pre-normalized: `normalize` acts in `combine`."""
        cfg_weights = self.cfg.get("weights")
        return resolve_weights([1.0] * len(pool) if cfg_weights is None else cfg_weights, pool, normalize=False)

    def prune(self, deltas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The pruned, rescaled deltas (N, d_out, d_in)."""
        raise NotImplementedError

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        pruned = self.prune(expert_deltas(A, B), generator)
        return combine(pruned, weights, self.combination() == "ties", self.normalize(), self.lam())
