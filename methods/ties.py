"""`method=ties`: TIES merging (Yadav et al. 2023) of the experts' dense deltas ``Δ_i = s_i B_i A_i``.

Per module: trim each Δ_i to its top-`density` magnitudes, elect the majority sign per entry
(`majority_sign_method`: ``total`` = sign of the summed trimmed deltas, ``frequency`` = the more common
sign), then the disjoint merge: the weighted mean of the entries that agree with it. The math is
`methods.ops.merge_ops` (peft's `merge_utils.ties`, batched over experts). weights=null is 1 per expert (the
disjoint merge already averages). ``fold: true`` adds the merged ΔW to the base weights; ``fold: false``
keeps it as a LoRA of `rank` (truncated SVD; null = max r_i), like peft's ``ties_svd``.
"""

from __future__ import annotations

from bench.registry import register_method
from methods.ops.merge_ops import DenseMergeMethod


@register_method("ties")
class Ties(DenseMergeMethod):
    kind = "ties"
