"""Machinery shared by the methods (not methods themselves): merge operations and their Triton kernels, gate
training, and decoding-time composition for text.

May import: the foundation, `bench.lora`, `bench.models`, `methods.base`, `tasks`.
"""
