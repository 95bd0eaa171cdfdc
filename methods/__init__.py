"""Composition methods: one module per method, each registered with `bench.registry.register_method` (`base.py` is
the contract; `ops/` holds the machinery several methods share).

May import: the foundation, `bench.lora`, `bench.models`, `tasks`.
"""
