"""`method=dare`: DARE (Yu et al. 2024, "drop and rescale") on the experts' dense deltas.

Per module and expert, drop each entry of ``Δ_i = s_i B_i A_i`` with probability ``1 - density`` and
rescale the survivors by ``1 / density`` (a mask seeded by the run seed and the module path, identical to
peft's `random_pruning` under the same seed), then combine: ``combination: linear`` is the weighted sum
(peft ``dare_linear``; weights=null is uniform 1/N, so density 1 equals `method=linear`), ``ties`` the
TIES sign election and disjoint mean (peft ``dare_ties``; weights=null is 1 per expert). Output as in
`method=ties`: folded, or a LoRA of `rank` by truncated SVD.
"""

from __future__ import annotations

from bench.errors import ConfigError
from bench.registry import register_method
from methods.ops.merge_ops import DenseMergeMethod

COMBINATIONS = ("linear", "ties")


@register_method("dare")
class Dare(DenseMergeMethod):
    def check_config(self) -> None:
        super().check_config()
        combination = self.cfg.get("combination", "linear")
        if combination not in COMBINATIONS:
            raise ConfigError(f"method.combination={combination!r}: must be one of {list(COMBINATIONS)}")

    def merge_kind(self) -> str:
        return f"dare_{self.cfg.get('combination', 'linear')}"
