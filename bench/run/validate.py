"""A job's config checked before anything is loaded or written: types, ranges, devices and names, one line each.

Types come from the defaults: the config composed with the same group choices (method, task, profile, model,
experts) and none of the user's key overrides is the reference; a value whose reference is an integer must be an
integer, a float a number, a bool a bool, a string a string (or a list, for keys that take one or several), a
list a list of the reference's element type. Keys whose default is null are the method's or task's to check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bench.errors import ConfigError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
PATH_NAMES = ("method.name", "task.name", "experts.name", "profile.name")  # parts of folder names
GROUPS = ("method", "task", "profile", "model", "experts", "paths")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _fits(value: Any, reference: Any) -> bool:
    if reference is None or value is None:
        return True
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(reference, str):
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if isinstance(reference, list):
        if not isinstance(value, list):
            return False
        kinds = {_kind(r) for r in reference if r is not None}
        return len(kinds) != 1 or all(_fits(v, next(r for r in reference if r is not None)) for v in value)
    if isinstance(reference, dict):
        return isinstance(value, dict)
    return True


def check_types(cfg: DictConfig, reference: DictConfig) -> None:
    """Raise `ConfigError` naming the first key of `cfg` whose value does not have its reference's type."""
    def walk(value: Any, ref: Any, key: str) -> None:
        if isinstance(ref, dict) and isinstance(value, dict):
            for k, v in value.items():
                if k in ref:
                    walk(v, ref[k], f"{key}.{k}" if key else str(k))
            return
        if not _fits(value, ref):
            expected = _kind(ref) if not isinstance(ref, list) else f"a list like {ref}"
            raise ConfigError(f"{key}={value!r}: expected {expected} (default {ref!r})")

    walk(_plain(cfg), _plain(reference), "")


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def check_values(cfg: DictConfig) -> None:
    """Ranges and availability that no type says: the seed, the number of fit examples, the device, names."""
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r}: expected an integer ≥ 0")
    fit = cfg.get("fit_examples")
    if not isinstance(fit, int) or isinstance(fit, bool) or fit < 0:
        raise ConfigError(f"fit_examples={fit!r}: expected an integer ≥ 0")
    check_device(str(cfg.get("device", "auto")))
    weights = OmegaConf.select(cfg, "method.weights")
    if weights is not None:  # a list in pool order or {expert: weight}; the method checks names and length
        values = list(weights.values()) if hasattr(weights, "values") else list(weights)
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            raise ConfigError(f"method.weights={OmegaConf.to_container(weights)}: expected numbers")
    for key in PATH_NAMES:
        value = OmegaConf.select(cfg, key)
        if value is not None:
            check_name(key, value)


def check_device(name: str) -> None:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`, and present on this machine."""
    if name in ("auto", "cpu"):
        return
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: torch finds no CUDA device on this machine (use device=cpu or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device=mps: MPS is not available on this machine")
        return
    raise ConfigError(f"device={name!r}: expected auto, cpu, cuda, cuda:N or mps")


def check_name(key: str, value: Any) -> None:
    """A name that becomes part of a folder name: letters, digits and ``_ . + = -``, no ``..``, no ``/``."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise ConfigError(f"{key}={value!r}: names become folder names; use letters, digits and _ . + = - "
                          f"(no '/' and no '..')")


def assignments(argv: list[str]) -> Iterator[tuple[str, str]]:
    """(key, value) of each ``key=value`` override on a command line (``+``/``++``/``~`` prefixes dropped)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep:
            yield key, value


LAUNCHER_PACKAGES = {  # conf/hydra/launcher option -> (the Hydra plugin it builds on, the pip package that has it)
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
}


def check_launcher(argv: list[str]) -> None:
    """Before Hydra starts: a ``hydra/launcher=`` choice whose optional plugin package is not installed is refused
    with the package to install (Hydra itself would only report a config it cannot find)."""
    import importlib.util

    for key, value in assignments(argv):
        if key == "hydra/launcher" and value in LAUNCHER_PACKAGES:
            module, package = LAUNCHER_PACKAGES[value]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"hydra/launcher={value} needs the {package} package, which is not installed: "
                                  f"pip install -e '.[all]' (or pip install {package})")


def refuse_unsafe_overrides(argv: list[str]) -> None:
    """Before Hydra creates a run folder: the command line's overrides of a name that becomes a path."""
    for key, value in assignments(argv):
        if key in PATH_NAMES:
            check_name(key, value.strip("'\""))


def reference_config(choices: dict[str, str | None]) -> DictConfig:
    """The config composed with these group choices only (inside a running Hydra app)."""
    from hydra import compose

    overrides = [f"{group}={choice}" for group, choice in choices.items() if group in GROUPS and choice]
    return compose(config_name="config", overrides=overrides)
