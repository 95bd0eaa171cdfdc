"""The LoRA composition benchmark harness."""
