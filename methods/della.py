"""`method=della`: DELLA-Merging (Deep et al. 2024) of the experts' dense deltas, as mergekit's ``della`` /
``della_linear`` (the combination: `methods.ops.task_arithmetic`).

Read from arcee-ai/mergekit at commit a6e402884ba9bc30da7f23e8304a35f19485de95: `mergekit/sparsify.py`
(`della_magprune`, `rescaled_masked_tensor`), `mergekit/merge_methods/generalized_task_arithmetic.py`
(`GTATask.execute`, `get_mask`) and `mergekit/merge_methods/registry.py` (``della``: sum consensus,
normalize and rescale on; ``della_linear``: no consensus, normalize off, rescale on); and the original DELLA
code in mergekit at commit 619f4e42543eab0cde35ef650925ae1109e93123 (`rank_magnitude`, by the paper's authors).

MAGPRUNE, per module and expert (`density` d < 1; d = 1 leaves Δ_i as is and draws nothing): in each row of
``Δ_i`` (one output unit, as mergekit ranks a 2-D weight along dim 1) the entry of magnitude rank
``ρ ∈ {0, …, d_in − 1}`` (ascending) is kept with probability ``k = d − ε + 2ε ρ / (d_in − 1)``, so
``k ∈ [d − ε, d + ε]`` rises with magnitude and averages d over the row; the masks are Bernoulli(k), drawn
from the per-module generator one expert at a time, experts in name order. Survivors are rescaled by
(`rescale`): ``probability`` 1/k = 1/(1 − p) (the paper and mergekit 619f4e4: E[Δ̂_i] = Δ_i; default), ``l1``
‖Δ_i‖₁ / ‖m ⊙ Δ_i‖₁ (mergekit a6e4028's ``rescale: true``), or ``none``.

Then mergekit's combination of the pruned deltas Δ̂_i with weights w_i, scaled by λ (`lambda`):
``combination: ties`` (``della``) elects ``σ = sgn(Σ_i w_i Δ̂_i)`` per entry (+1 at 0) and sums the agreeing
``w_i Δ̂_i`` (``sgn(w_i Δ̂_i) = σ``; zeros never agree); ``linear`` (``della_linear``) sums all ``w_i Δ̂_i``.
``normalize`` divides that sum by the sum of the weights taken part, per entry for ties (Σ of agreeing w_i)
and overall for linear (Σ w_i); a divisor of 0 (|·| < 1e-8 for linear) counts as 1. normalize=null is
mergekit's default: true for ties, false for linear. weights=null is 1 per expert (mergekit requires one
per model); the weights are never pre-normalized (`normalize` is mergekit's, not `resolve_weights`').

Differences from `methods.ops.merge_ops` (peft's TIES): mergekit elects the sign of the *weighted* sum and
divides by the agreeing weights (or not at all), peft elects on the unweighted deltas and divides by the
agreeing count; so `methods.ops.task_arithmetic` has its own combination. A row of one entry
(d_in = 1) gets k = d − ε here; mergekit divides 0 by 0 there.
Output: folded, or a LoRA of `rank` by truncated SVD (`compose_deltas`).
"""

from __future__ import annotations

import torch

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.task_arithmetic import TaskArithmeticMerge, l1_rescaled


# --------------------------------------------------------------------- DELLA's MAGPRUNE


def keep_probabilities(deltas: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep probabilities (N, d_out, d_in): per row, ``d − ε + 2ε ρ / (d_in − 1)`` for the entry of
    ascending magnitude rank ρ (a stable sort orders equal magnitudes by position)."""
    ranks = deltas.abs().argsort(dim=-1, stable=True).argsort(dim=-1).to(deltas.dtype)
    return ranks.mul_(2 * epsilon / max(deltas.shape[-1] - 1, 1)).add_(density - epsilon)


def magprune(deltas: torch.Tensor, density: float, epsilon: float, rescale: str,
             generator: torch.Generator | None) -> torch.Tensor:
    """MAGPRUNE of each expert's delta: Bernoulli(`keep_probabilities`) masks, one draw per expert in order,
    survivors rescaled by 1/k (``probability``), to the delta's L1 norm (``l1``) or not (``none``).
    density ≥ 1 returns `deltas` (no draws)."""
    if density >= 1:
        return deltas
    keep = keep_probabilities(deltas, density, epsilon)
    masks = torch.empty_like(keep)
    for i in range(keep.shape[0]):
        torch.bernoulli(keep[i], generator=generator, out=masks[i])
    if rescale == "probability":
        return deltas * masks / keep
    return l1_rescaled(deltas, masks) if rescale == "l1" else deltas * masks


@register_method("della")
class Della(TaskArithmeticMerge):
    seeded = True
    COMBINATIONS = ("ties", "linear")
    RESCALES = ("probability", "l1", "none")
    NORMALIZE_DEFAULT = {"ties": True, "linear": False}

    def check_config(self) -> None:
        super().check_config()
        density = self.density()
        epsilon = self.cfg.get("epsilon", 0.15)
        try:
            eps = float(epsilon)
        except (TypeError, ValueError):
            raise ConfigError(f"method.epsilon={epsilon!r}: must be a number ≥ 0") from None
        if isinstance(epsilon, bool) or not eps >= 0:
            raise ConfigError(f"method.epsilon={epsilon!r}: must be a number ≥ 0")
        if density < 1 and not (density - eps > 0 and density + eps < 1):
            raise ConfigError(f"method.epsilon={epsilon}: density ± epsilon must lie in (0, 1) (density={density})")

    def prune(self, deltas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return magprune(deltas, self.density(), float(self.cfg.get("epsilon", 0.15)), self.rescale(), generator)
