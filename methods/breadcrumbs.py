"""`method=breadcrumbs`: Model Breadcrumbs (Davari & Belilovsky 2023) of the experts' dense deltas, as mergekit's
``breadcrumbs`` / ``breadcrumbs_ties``.

Read from arcee-ai/mergekit at commit a6e402884ba9bc30da7f23e8304a35f19485de95: `mergekit/sparsify.py`
(`magnitude_outliers`, `rescaled_masked_tensor`), `mergekit/merge_methods/generalized_task_arithmetic.py`
(`GTATask.execute`, `get_mask`; defaults ``gamma`` 0.01, ``lambda`` 1) and `mergekit/merge_methods/registry.py`
(``breadcrumbs``: no consensus; ``breadcrumbs_ties``: sum consensus; both normalize and rescale off).

Pruning, per module and expert, over the whole ``Δ_i`` (per tensor, as mergekit flattens it), for `density`
d < 1 (d = 1 keeps every entry, outliers too): with ``n = numel``, ``t = ⌊d n⌋``, ``n_top = ⌊γ n⌋`` and
``n_bot = n − t − n_top`` (when negative: ``n_top = n − t``, ``n_bot = 0``), keep the entries of ascending
magnitude rank ``n_bot ≤ ρ < n − n_top``: the ``n_top`` largest magnitudes (outliers, `gamma` γ) and the
``n_bot`` smallest are dropped, exactly t entries remain (a stable sort orders equal magnitudes by position).
``rescale: l1`` scales the survivors back to ‖Δ_i‖₁ (mergekit's ``rescale: true``); ``none`` (default) does not.

Then mergekit's combination (`methods.della.combine`): ``combination: linear`` (``breadcrumbs``, task
arithmetic) ``λ Σ_i w_i Δ̂_i``; ``ties`` (``breadcrumbs_ties``) the same sum over the experts agreeing with the
elected sign of ``Σ_i w_i Δ̂_i``. ``normalize`` (null = mergekit's default, false) divides by the weights taken
part (per entry for ties). weights=null is 1 per expert, never pre-normalized.

Deviation: mergekit keeps ``indices[n_bot:-n_top]``, which is empty when ``n_top = 0`` (γ n < 1, e.g. γ = 0), so
it zeroes the whole delta; here n_top = 0 keeps the t largest magnitudes, as the definition says.
Output: folded, or a LoRA of `rank` by truncated SVD (`compose_deltas`).
"""

from __future__ import annotations

import torch

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.task_arithmetic import TaskArithmeticMerge, l1_rescaled


def outlier_masks(deltas: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per expert, the boolean mask (N, …) of the entries of ascending magnitude rank in ``[n_bot, n − n_top)``
    over the whole delta (mergekit's `magnitude_outliers`)."""
    n = deltas[0].numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    ranks = deltas.abs().flatten(1).argsort(dim=1, stable=True).argsort(dim=1)
    return ((ranks >= n_bot) & (ranks < n - n_top)).view(deltas.shape)


@register_method("breadcrumbs")
class Breadcrumbs(TaskArithmeticMerge):
    COMBINATIONS = ("linear", "ties")
    RESCALES = ("none", "l1")
    NORMALIZE_DEFAULT = {"linear": False, "ties": False}

    def check_config(self) -> None:
        super().check_config()
        gamma = self.cfg.get("gamma", 0.01)
        try:
            ok = not isinstance(gamma, bool) and 0.0 <= float(gamma) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"method.gamma={gamma!r}: must be a number in [0, 1]")

    def prune(self, deltas: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        density = self.density()
        if density >= 1:
            return deltas
        masks = outlier_masks(deltas, density, float(self.cfg.get("gamma", 0.01)))
        return l1_rescaled(deltas, masks) if self.rescale() == "l1" else deltas * masks
