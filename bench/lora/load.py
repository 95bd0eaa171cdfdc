"""Loading an adapter from a folder or hub id in whichever format it is: a peft folder (`bench.lora.adapters`) or a
diffusers LoRA folder (`bench.lora.diffusers_lora`). Kept apart from both so that neither imports the other."""

from __future__ import annotations

from pathlib import Path

from bench.lora.adapters import CONFIG_FILE, LoraAdapter, resolve_adapter_folder
from bench.lora.diffusers_lora import find_weights, load_diffusers_lora


def load_adapter(source: str | Path, name: str | None = None, cache_dir: str | None = None) -> LoraAdapter:
    """A peft adapter, or a diffusers LoRA folder (``pytorch_lora_weights.safetensors``), from a local folder or a
    hub id (``user/repo`` or ``user/repo/subfolder``)."""
    folder = resolve_adapter_folder(source, cache_dir)
    if not (folder / CONFIG_FILE).is_file() and find_weights(folder) is not None:
        return load_diffusers_lora(folder, name=name)
    return LoraAdapter.from_peft_folder(folder, name=name)
