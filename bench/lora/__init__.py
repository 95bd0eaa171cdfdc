"""The LoRA data model: adapters and their file formats (peft folders, diffusers/kohya state dicts), expert pools,
and the stacked N-expert layer that gated methods route through.

May import: `bench.errors`, `bench.config`, `bench.files` (the foundation) — nothing from `bench.models`,
`bench.experts`, `bench.run`, `bench.analysis`, `methods` or `tasks`.
"""
