"""The LoRA composition benchmark harness.

Packages, in the order imports may flow (docs/layout.md; `tests/test_layout.py` enforces it): the foundation here
(`config`, `errors`, `files`, `progress`, `registry`) → `bench.lora` (the LoRA data model) → `bench.models` (base
models and the generation engine) → `methods`, `tasks` → `bench.experts` (expert pools) → `bench.run` (jobs) →
`bench.analysis` (results) → `bench.perf` (benchmarks).
"""
