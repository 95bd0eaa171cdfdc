"""`method=single`: each expert alone, one variant (one row) per expert."""

from __future__ import annotations

from typing import Iterator

from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method


@register_method("single")
class SingleExpert(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return False  # no fit examples, no sampling, no random draws

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        for adapter in ctx.pool:
            with ctx.model.adapter_applied(adapter):
                yield Composed(ctx.model, FitReport(info={"expert": adapter.name}), f"expert={adapter.name}", adapter)
