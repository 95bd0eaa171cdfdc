"""The LoRA data model: `LoraModule`, `LoraAdapter`, and their peft-folder I/O (DESIGN §2).

A `LoraModule` holds one target linear layer's factors: `A (r × d_in)`, `B (d_out × r)` and the scalar
`scale` (alpha / r, or alpha / sqrt(r) under rsLoRA), so that its update is `ΔW = scale · B @ A`.
A `LoraAdapter` maps module paths inside the base model (``model.layers.0.self_attn.q_proj``) to modules.

Adapters load from and save to peft adapter folders (``adapter_config.json`` + safetensors, or a
``.bin`` read with ``torch.load(weights_only=True)``) or a hub id; every load is validated and every
error names the adapter and the field at fault.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_SAFETENSORS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
METADATA_FILE = "bench_metadata.json"  # what the harness knows of an expert (its task, training run)
_PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# peft config fields whose non-default values change what the adapter computes and which this data
# model cannot represent: field -> the value(s) we accept.
_UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, [], ()),
    "layer_replication": (None, [], ()),
    "trainable_token_indices": (None, [], {}, ()),
    "target_parameters": (None, [], ()),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None, [], ()),
}


@dataclass
class LoraModule:
    """One LoRA'd linear layer: ``ΔW = scale · B @ A``."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise AdapterError(
                f"LoRA factors do not fit: A is {tuple(self.A.shape)}, B is {tuple(self.B.shape)} "
                "(expected A (r × d_in) and B (d_out × r))"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update ``scale · B @ A`` (d_out × d_in)."""
        A, B = (self.A, self.B) if dtype is None else (self.A.to(dtype), self.B.to(dtype))
        return self.scale * (B @ A)

    def to(self, *args, **kwargs) -> "LoraModule":
        return LoraModule(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs), self.scale)


@dataclass
class LoraAdapter:
    """A named set of LoRA modules trained on one base model."""

    name: str
    base_model: str
    modules: dict[str, LoraModule]
    use_rslora: bool = False
    task_type: str | None = "CAUSAL_LM"
    metadata: dict = field(default_factory=dict)

    # ----------------------------------------------------------------- properties
    @property
    def target_names(self) -> list[str]:
        """The distinct leaf names of the targeted modules (``q_proj``, ``v_proj``, ...)."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> (d_out, d_in) of the base linear layer it adapts."""
        return {name: (m.d_out, m.d_in) for name, m in self.modules.items()}

    def to(self, *args, **kwargs) -> "LoraAdapter":
        return LoraAdapter(
            self.name, self.base_model, {k: m.to(*args, **kwargs) for k, m in self.modules.items()},
            self.use_rslora, self.task_type, dict(self.metadata),
        )

    def validate_finite(self) -> None:
        for name, m in self.modules.items():
            for factor, t in (("A", m.A), ("B", m.B)):
                if not torch.isfinite(t).all():
                    raise AdapterError(f"adapter {self.name!r}: module {name}.lora_{factor} holds NaN or inf values")

    # ----------------------------------------------------------------- I/O
    @classmethod
    def from_peft_folder(cls, folder: str | Path, name: str | None = None) -> "LoraAdapter":
        folder = Path(folder)
        name = name or folder.name
        config = _read_config(folder, name)
        state = _read_weights(folder, name)
        adapter = cls.from_peft_state(state, config, name)
        meta = folder / METADATA_FILE
        if meta.is_file():
            adapter.metadata = json.loads(meta.read_text())
        return adapter

    @classmethod
    def from_peft_state(cls, state: dict[str, torch.Tensor], config: dict, name: str) -> "LoraAdapter":
        """Build an adapter from a peft state dict and its adapter config (validated)."""
        _check_config(config, name)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _KEY_RE.match(key)
            if match is None:
                raise AdapterError(
                    f"adapter {name!r}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported; "
                    "biases, embeddings and modules_to_save are not)"
                )
            module = match["module"].removeprefix(_PEFT_PREFIX)
            factors.setdefault(module, {})[match["factor"]] = tensor
        if not factors:
            raise AdapterError(f"adapter {name!r}: the weights file holds no LoRA tensors")
        r_default, alpha_default = int(config["r"]), float(config["lora_alpha"])
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        use_rslora = bool(config.get("use_rslora", False))
        modules = {}
        for module, pair in sorted(factors.items()):
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"adapter {name!r}: module {module} lacks lora_{'B' if 'A' in pair else 'A'}")
            r = int(_pattern_value(rank_pattern, module, r_default))
            alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
            if pair["A"].shape[0] != r:
                raise AdapterError(
                    f"adapter {name!r}: module {module} has rank {pair['A'].shape[0]} but the config says r={r}"
                )
            scale = alpha / math.sqrt(r) if use_rslora else alpha / r
            modules[module] = LoraModule(pair["A"], pair["B"], scale)
        adapter = cls(
            name=name,
            base_model=str(config.get("base_model_name_or_path") or ""),
            modules=modules,
            use_rslora=use_rslora,
            task_type=config.get("task_type"),
        )
        adapter.validate_finite()
        return adapter

    def peft_config(self) -> dict:
        """A peft ``LoraConfig`` (as kwargs) that reproduces this adapter's ranks and scales exactly."""
        ranks = Counter(m.rank for m in self.modules.values())
        r = ranks.most_common(1)[0][0]
        alphas = {k: self._alpha(m) for k, m in self.modules.items()}
        alpha = Counter(a for k, a in alphas.items() if self.modules[k].rank == r).most_common(1)[0][0]
        rank_pattern = {re.escape(k): m.rank for k, m in self.modules.items() if m.rank != r}
        alpha_pattern = {re.escape(k): a for k, a in alphas.items() if a != alpha}
        return dict(
            r=r,
            lora_alpha=alpha,
            target_modules=self.target_names,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_rslora=self.use_rslora,
            lora_dropout=0.0,
            bias="none",
            task_type=self.task_type,
            base_model_name_or_path=self.base_model,
        )

    def _alpha(self, m: LoraModule) -> float:
        return m.scale * (math.sqrt(m.rank) if self.use_rslora else m.rank)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under peft's saved key names (``base_model.model.<module>.lora_A.weight``)."""
        state = {}
        for module, m in self.modules.items():
            state[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = m.A.contiguous()
            state[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = m.B.contiguous()
        return state

    def save(self, folder: str | Path) -> Path:
        """Write a peft adapter folder (config + safetensors) atomically: a folder appears complete or not at all."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            _rmtree(tmp)
        tmp.mkdir(parents=True)
        kwargs = self.peft_config()
        base = kwargs.pop("base_model_name_or_path")
        config = LoraConfig(**kwargs)
        config.base_model_name_or_path = base
        config.save_pretrained(str(tmp))
        save_file(self.peft_state_dict(), str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
        if self.metadata:
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, default=str))
        if folder.exists():
            _rmtree(folder)
        tmp.rename(folder)
        return folder


# --------------------------------------------------------------------- helpers


def resolve_adapter_folder(source: str | Path, cache_dir: str | None = None) -> Path:
    """A local folder, or a hub id downloaded (or found in the hub cache) as a snapshot folder."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AdapterError(f"adapter {str(source)!r}: expected a peft adapter folder, found a file")
        return path
    if str(source).startswith((".", "/", "~")) or str(source).count("/") == 0:
        raise AdapterError(f"adapter {str(source)!r}: no such folder")
    parts = str(source).split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        root = snapshot_download(repo_id, allow_patterns=[pattern], cache_dir=cache_dir)
    except Exception as exc:  # network errors, missing repos, offline mode
        raise AdapterError(
            f"adapter {str(source)!r}: not a local folder, and the hub download failed ({type(exc).__name__}: {exc})"
        ) from exc
    return Path(root) / subfolder


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} is missing (not a peft adapter folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {path} is not valid JSON ({exc})") from exc
    return config


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st, binary = folder / WEIGHTS_SAFETENSORS, folder / WEIGHTS_BIN
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binary.is_file():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as exc:
        bad = st if st.is_file() else binary
        raise AdapterError(f"adapter {name!r}: cannot read {bad} ({type(exc).__name__}: {exc}); is it corrupt?") from exc
    raise AdapterError(f"adapter {name!r}: no weights in {folder} (expected {WEIGHTS_SAFETENSORS} or {WEIGHTS_BIN})")


def _check_config(config: dict, name: str) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type={peft_type!r}; only LORA adapters can be composed")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"adapter {name!r}: adapter_config.json lacks {key!r}")
    for key, accepted in _UNSUPPORTED_FIELDS.items():
        value = config.get(key)
        if value not in accepted:
            raise AdapterError(
                f"adapter {name!r}: unsupported peft feature {key}={value!r} "
                "(composition methods need plain LoRA factors A and B)"
            )


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha pattern lookup: the first key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)
