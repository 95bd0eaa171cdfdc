"""Base models: loading (hub, local folders, the SmolLM2 GGUF, configs), the `LanguageModel` wrapper with its
generation engine (token-budget batches, grouped-query decode attention, CUDA-graph decoding) and the diffusion
model wrapper.

May import: the foundation (`bench.errors`, `bench.config`, `bench.files`, `bench.progress`, `bench.registry`)
and `bench.lora`.
"""
