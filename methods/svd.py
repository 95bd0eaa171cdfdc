"""`method=svd`: the exact weighted sum ``λ Σ_i w_i s_i B_i A_i`` re-factorized to a LoRA of rank k.

Per module, the best rank-k approximation (Eckart–Young) of the exact linear merge, computed from the
concatenated factors (`methods.linear.concat_merge` + `svd_refactor`: QR of the factors and an SVD of the
small core, never the dense matrix). weights=null is uniform 1/N; `rank` null is max r_i (peft's default).

Equal to peft's ``add_weighted_adapter(combination_type="svd")`` up to rounding when the experts do not use
rsLoRA: peft's merged adapter then has ``lora_alpha = r`` and scale 1. Under rsLoRA (``use_rslora: true``) peft's
merged adapter keeps rsLoRA scaling, ``r / √r = √r``, so its update is √r times the truncated sum; ours stays the
truncated sum (`tests/test_peft_compat.py` checks both statements).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from bench.lora.adapters import LoraAdapter
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.linear import concat_merge, resolve_weights, svd_refactor
from methods.ops.merge_ops import check_rank, max_rank


def svd_merge(adapters: Sequence[LoraAdapter], weights: Sequence[float], rank: int, name: str = "svd") -> LoraAdapter:
    """The rank-`rank` truncated SVD of each module's exact ``Σ_i w_i s_i B_i A_i`` (scale 1)."""
    return svd_refactor(concat_merge(adapters, weights, name=name), rank, name=name)


@register_method("svd")
class SvdMerge(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return False  # no fit examples, no sampling, no random draws

    def check_config(self) -> None:
        check_rank(self.cfg.get("rank"))

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        with Timer() as timer:
            weights = resolve_weights(self.cfg.get("weights"), ctx.pool, bool(self.cfg.get("normalize", False)))
            lam = float(self.cfg.get("lambda", 1.0))
            rank = check_rank(self.cfg.get("rank")) or max_rank(list(ctx.pool))
            merged = svd_merge(list(ctx.pool), [lam * w for w in weights], rank)
            merged.metadata = {"method": "svd", "experts": ctx.pool.names, "weights": weights, "lambda": lam,
                               "rank": rank}
        report = FitReport(seconds=timer.seconds, info={"weights": weights, "rank": rank})
        with ctx.model.adapter_applied(merged):
            yield Composed(ctx.model, report, "", merged)
