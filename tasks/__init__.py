"""Tasks: one module per task family, each registered with `bench.registry.register_task` (`base.py` is the
contract, `metrics` the scoring).

May import: the foundation, `bench.lora`, `bench.models` (and `methods.base` for type annotations only).
"""
