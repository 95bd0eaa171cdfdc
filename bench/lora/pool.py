"""`ExpertPool`: an ordered list of LoRA adapters of one base model, validated together (DESIGN §2)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import AdapterError
from bench.lora.adapters import LoraAdapter
from bench.lora.load import load_adapter


def same_base(a: str, b: str) -> bool:
    """Whether two base-model ids name the same model: equal, or equal last path component (a hub id vs a
    local copy of it, ``HuggingFaceTB/SmolLM2-135M-Instruct`` vs ``/models/SmolLM2-135M-Instruct``)."""
    norm = lambda s: s.rstrip("/").lower()  # noqa: E731
    return norm(a) == norm(b) or norm(a).rsplit("/", 1)[-1] == norm(b).rsplit("/", 1)[-1]


@dataclass
class ExpertPool:
    """Adapters in a fixed order; `names[i]` is expert i everywhere (weights, gates, records)."""

    base_model: str
    adapters: list[LoraAdapter]

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return len(self.adapters)

    def __iter__(self):
        return iter(self.adapters)

    def __getitem__(self, i: int) -> LoraAdapter:
        return self.adapters[i]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def module_names(self) -> list[str]:
        return list(self.adapters[0].modules)

    def validate(self) -> None:
        """Same base model, same module names and (d_out, d_in) shapes across the pool; unique names."""
        if not self.adapters:
            raise AdapterError("expert pool is empty")
        dupes = [n for n in set(self.names) if self.names.count(n) > 1]
        if dupes:
            raise AdapterError(f"expert pool has duplicate adapter names: {sorted(dupes)}")
        for a in self.adapters:
            if a.base_model and not same_base(a.base_model, self.base_model):
                raise AdapterError(
                    f"adapter {a.name!r} was trained on base model {a.base_model!r}, "
                    f"but this pool is for {self.base_model!r}"
                )
        ref = self.adapters[0]
        ref_shapes = ref.shapes()
        for a in self.adapters[1:]:
            shapes = a.shapes()
            if set(shapes) != set(ref_shapes):
                only_a = sorted(set(shapes) - set(ref_shapes))[:3]
                only_ref = sorted(set(ref_shapes) - set(shapes))[:3]
                raise AdapterError(
                    f"adapters {a.name!r} and {ref.name!r} target different modules: "
                    f"only in {a.name!r}: {only_a}; only in {ref.name!r}: {only_ref}"
                )
            for module, shape in shapes.items():
                if shape != ref_shapes[module]:
                    raise AdapterError(
                        f"adapters {a.name!r} and {ref.name!r} disagree on the shape of {module}: "
                        f"{shape} vs {ref_shapes[module]} (d_out, d_in)"
                    )

    def check_model(self, model: torch.nn.Module) -> None:
        """Every targeted module exists in `model` as a linear layer of the adapters' shape."""
        named = dict(model.named_modules())
        for module, (d_out, d_in) in self.adapters[0].shapes().items():
            layer = named.get(module)
            if layer is None:
                raise AdapterError(
                    f"adapter {self.adapters[0].name!r} targets {module}, which the base model does not have "
                    f"(adapters for another architecture?)"
                )
            weight = getattr(layer, "weight", None)
            if weight is None or tuple(weight.shape) != (d_out, d_in):
                got = None if weight is None else tuple(weight.shape)
                raise AdapterError(
                    f"adapter {self.adapters[0].name!r}: {module} is {(d_out, d_in)} in the adapter but {got} "
                    "in the base model (adapters for another base model?)"
                )

    def sample(self, n: int | None, seed: int) -> "ExpertPool":
        """`n` experts drawn with `seed` (kept in pool order); the whole pool when n is None or ≥ its size."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise AdapterError(f"cannot sample n={n} experts")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return ExpertPool(self.base_model, [self.adapters[i] for i in idx])

    def subset(self, names: list[str]) -> "ExpertPool":
        missing = [n for n in names if n not in self.names]
        if missing:
            raise AdapterError(f"unknown experts {missing}; the pool has {self.names}")
        return ExpertPool(self.base_model, [a for a in self.adapters if a.name in names])

    def to(self, *args, **kwargs) -> "ExpertPool":
        return ExpertPool(self.base_model, [a.to(*args, **kwargs) for a in self.adapters])

    @classmethod
    def from_sources(cls, base_model: str, sources: list[str | Path], cache_dir: str | None = None) -> "ExpertPool":
        """Load each adapter (peft folder or hub id) in order and validate the pool."""
        return cls(base_model, [load_adapter(s, cache_dir=cache_dir) for s in sources])
