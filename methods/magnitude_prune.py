"""`method=magnitude_prune`: task arithmetic on magnitude-trimmed dense deltas (peft's ``magnitude_prune``).

Per module: keep each expert's top-`density` magnitudes of ``Δ_i = s_i B_i A_i``, then ``Σ_i w_i Δ_i``
(weights=null is uniform 1/N). No sign election: it is TIES' trim step alone. Output as in `method=ties`:
``fold: true`` into the base weights, or a LoRA of `rank` by truncated SVD.
"""

from __future__ import annotations

from bench.registry import register_method
from methods.ops.merge_ops import DenseMergeMethod


@register_method("magnitude_prune")
class MagnitudePrune(DenseMergeMethod):
    kind = "magnitude_prune"
