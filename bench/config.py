"""Project paths and the OmegaConf resolvers the configs use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def default_data_root() -> str | None:
    """`$BENCH_DATA_ROOT`, else ``../shared/data`` beside the project when it exists, else None (hub)."""
    env = os.environ.get("BENCH_DATA_ROOT")
    if env:
        return env
    shared = PROJECT_ROOT.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def register_resolvers() -> None:
    """`${bench.data_root:}` and `${bench.root:}` for the YAML files (idempotent)."""
    if not OmegaConf.has_resolver("bench.data_root"):
        OmegaConf.register_new_resolver("bench.data_root", default_data_root)
    if not OmegaConf.has_resolver("bench.root"):
        OmegaConf.register_new_resolver("bench.root", lambda: str(PROJECT_ROOT))


def compose_config(overrides: list[str]) -> DictConfig:
    """The project's config (``conf/config.yaml``) with Hydra `overrides`, composed outside a Hydra app (tools
    such as `bench.analysis.crosscheck` and `bench.analysis.mc_ceiling`)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def load_group_option(group: str, name: str) -> DictConfig:
    """One option of a config group read directly (e.g. the task config an expert pool trains on)."""
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        from bench.errors import ConfigError

        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ConfigError(f"no {group} config {name!r}; known: {known}")
    return OmegaConf.load(path)
