"""`method=oracle`: the best single expert per fit unit, chosen by the task metric on the fit examples.

It is "oracle" in the LoraHub sense (an upper reference for picking one expert), but fair: it sees only
the fit examples every trainable method gets, never the eval set.
"""

from __future__ import annotations

from typing import Iterator

from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer


@register_method("oracle")
class OracleExpert(Method):
    domains = ("nlp", "vl")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        fit_scores = {}
        with Timer() as timer:
            for adapter in ctx.pool:
                with ctx.model.adapter_applied(adapter):
                    fit_scores[adapter.name] = ctx.score(Composed(ctx.model, FitReport()), ctx.fit_examples)
        best = max(ctx.pool, key=lambda a: fit_scores[a.name])  # ties: the first in pool order
        report = FitReport(
            examples=len(ctx.fit_examples), seconds=timer.seconds,
            info={"expert": best.name, "fit_scores": fit_scores},
        )
        with ctx.model.adapter_applied(best):
            yield Composed(ctx.model, report, "", best)
