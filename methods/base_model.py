"""`method=base`: the base model alone, no adapter (the floor of every table)."""

from __future__ import annotations

from typing import Iterator

from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method


@register_method("base")
class BaseModel(Method):
    domains = ("nlp", "vl")

    def uses_seed(self) -> bool:
        return False  # no fit examples, no sampling, no random draws

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        yield Composed(ctx.model, FitReport())
