"""Diffusers LoRA files <-> `LoraAdapter`.

A diffusers LoRA folder holds ``pytorch_lora_weights.safetensors`` with peft-format keys prefixed by the component
(``unet.<module>.lora_A.weight``, ``text_encoder.<module>.lora_B.weight``) and, in its safetensors header, the
``lora_adapter_metadata`` that diffusers turns into each component's ``LoraConfig`` (rank, alpha, patterns), so
``StableDiffusionPipeline.load_lora_weights(folder)`` reproduces our scales exactly. We also write
``bench_adapter.json`` (name, base model id, and the metadata of `LoraAdapter.metadata`), which diffusers ignores.

Reading goes through ``StableDiffusionPipeline.lora_state_dict``, so kohya / older diffusers files from the hub are
converted by diffusers first; alphas come from the header metadata, else from the file's network alphas, else the
diffusers convention alpha = rank (scale 1). DoRA, LoRA biases, convolution LoRAs and SDXL's second text encoder
are refused with an error naming the adapter and the field.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import torch

from bench.errors import AdapterError
from bench.lora.adapters import LoraAdapter, LoraModule

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SIDECAR = "bench_adapter.json"
COMPONENTS = ("unet", "text_encoder")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def find_weights(folder: Path) -> Path | None:
    """The diffusers LoRA file of a folder: ``pytorch_lora_weights.safetensors``, else its only ``*.safetensors``."""
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME
    candidates = sorted(folder.glob("*.safetensors"))
    return candidates[0] if len(candidates) == 1 else None


# --------------------------------------------------------------------- writing


def component_config(adapter: LoraAdapter, component: str) -> dict:
    """The ``LoraConfig`` kwargs (diffusers' per-component metadata) that reproduce this component's scales."""
    prefix = component + "."
    modules = {k[len(prefix):]: m for k, m in adapter.modules.items() if k.startswith(prefix)}
    alphas = {k: _alpha(m, adapter.use_rslora) for k, m in modules.items()}
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(k): m.rank for k, m in modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != alpha},
        "use_rslora": adapter.use_rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def save_diffusers_lora(adapter: LoraAdapter, folder: str | Path) -> Path:
    """Write `adapter` as a diffusers LoRA folder (atomically: the folder appears complete or not at all)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    bad = sorted({k.split(".", 1)[0] for k in adapter.modules} - set(COMPONENTS))
    if bad:
        raise AdapterError(f"adapter {adapter.name!r}: module paths must start with one of {COMPONENTS}, got {bad}")
    layers, metadata = {}, {}
    for component in COMPONENTS:
        prefix = component + "."
        state = {}
        for k, m in adapter.modules.items():
            if k.startswith(prefix):
                state[f"{k[len(prefix):]}.lora_A.weight"] = m.A.detach().contiguous().cpu()
                state[f"{k[len(prefix):]}.lora_B.weight"] = m.B.detach().contiguous().cpu()
        if state:
            layers[component], metadata[component] = state, component_config(adapter, component)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
        unet_lora_adapter_metadata=metadata.get("unet"),
        text_encoder_lora_adapter_metadata=metadata.get("text_encoder"),
    )
    sidecar = {"name": adapter.name, "base_model": adapter.base_model, "metadata": adapter.metadata}
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _alpha(m: LoraModule, rslora: bool) -> float:
    return m.scale * (math.sqrt(m.rank) if rslora else m.rank)


# --------------------------------------------------------------------- reading


def load_diffusers_lora(source: str | Path, name: str | None = None, base_model: str | None = None) -> LoraAdapter:
    """A `LoraAdapter` from a diffusers LoRA folder or file, validated (see the module docstring)."""
    from diffusers import StableDiffusionPipeline

    path = Path(source)
    folder = path if path.is_dir() else path.parent
    weights = find_weights(path) if path.is_dir() else path
    sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else {}
    name = name or sidecar.get("name") or (folder.name if path.is_dir() else path.stem)
    if weights is None or not weights.is_file():
        raise AdapterError(f"adapter {name!r}: no diffusers LoRA file in {path} (expected {WEIGHTS_NAME})")
    try:
        state, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(weights.parent), weight_name=weights.name, return_lora_metadata=True
        )
    except Exception as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {weights} ({type(exc).__name__}: {exc})") from exc
    metadata = metadata or {}
    modules: dict[str, LoraModule] = {}
    use_rslora = False
    for component in sorted({k.split(".", 1)[0] for k in state}):
        if component not in COMPONENTS:
            raise AdapterError(
                f"adapter {name!r}: tensors for {component!r} (only {COMPONENTS} are supported; SDXL LoRAs are not)"
            )
        prefix = component + "."
        try:
            part = _to_peft(component, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        except ValueError as exc:
            raise AdapterError(f"adapter {name!r}: unrecognized {component} LoRA key format ({exc})") from exc
        config = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
        alphas = _alphas(component, state, network_alphas or {}, part)
        for key, value in (("use_dora", False), ("lora_bias", False)):
            if config.get(key, value) != value:
                raise AdapterError(f"adapter {name!r}: unsupported {component} LoRA feature {key}={config[key]!r}")
        use_rslora = use_rslora or bool(config.get("use_rslora", False))
        for module, pair in _factors(part, name, component).items():
            scale = _scale(module, pair["A"].shape[0], config, alphas)
            modules[f"{component}.{module}"] = LoraModule(pair["A"], pair["B"], scale)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {weights} holds no LoRA tensors")
    adapter = LoraAdapter(name=name, base_model=base_model or sidecar.get("base_model", ""), modules=modules,
                          use_rslora=use_rslora, task_type=None, metadata=sidecar.get("metadata", {}))
    adapter.validate_finite()
    return adapter


def _to_peft(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in peft form (``<module>.lora_A.weight``), converted as diffusers converts each component on load."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    if component == "unet":
        return convert_unet_state_dict_to_peft(state)
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    return {_text_model_free(k): v for k, v in state.items()}


def _alphas(component: str, state: dict, network_alphas: dict, part: dict) -> dict[str, float]:
    """Module path -> network alpha. An alpha is keyed by its down weight's original key + ``.alpha`` (kohya files
    after diffusers' conversion), or by the module path + ``.alpha``; the converters keep the tensor objects, which
    maps an original key to its converted module."""
    converted = {id(v): k.split(".lora_")[0] for k, v in part.items()}
    prefix, out = component + ".", {}
    for key, value in network_alphas.items():
        if not key.startswith(prefix) or not key.endswith(".alpha"):
            continue
        stem = key[: -len(".alpha")]
        down = state.get(stem)
        module = converted.get(id(down)) if down is not None else None
        out[module or _text_model_free(stem[len(prefix):])] = float(value)
    return out


def _text_model_free(key: str) -> str:
    """transformers 5 flattened CLIPTextModel (no ``text_model.`` level): older files name it, our models do not."""
    return key.removeprefix("text_model.")


def _factors(state: dict[str, torch.Tensor], name: str, component: str) -> dict[str, dict[str, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is None:
            what = ("DoRA magnitudes" if "lora_magnitude_vector" in key
                    else "LoRA biases" if key.endswith(".bias") else "unknown tensors")
            raise AdapterError(
                f"adapter {name!r}: unsupported tensor {component}.{key} ({what}; only lora_A/lora_B weights)"
            )
        if tensor.dim() != 2:
            raise AdapterError(
                f"adapter {name!r}: {component}.{key} has shape {tuple(tensor.shape)}: convolution LoRAs are not "
                "supported (only linear layers)"
            )
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {component}.{module} lacks lora_{'B' if 'A' in pair else 'A'}")
    return factors


def _scale(module: str, rank: int, config: dict, alphas: dict[str, float]) -> float:
    """alpha / r from the header metadata (patterns as peft matches them), else network alphas, else 1."""
    if config:
        from bench.lora.adapters import _pattern_value

        r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        if r != rank:
            raise AdapterError(f"{module}: rank {rank} in the weights but r={r} in the file's metadata")
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if module in alphas:
        return alphas[module] / rank
    return 1.0
