"""Every YAML under conf/ starts with a usage line, composes, and instantiates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.config import CONF_DIR, register_resolvers
from bench.errors import DataError
from bench.models.loading import check_model_config
from bench.registry import get_method, get_task
from conftest import DATA_ROOT

register_resolvers()
ALL_YAML = sorted(p.relative_to(CONF_DIR) for p in CONF_DIR.rglob("*.yaml"))
GROUP_OVERRIDES = {"experts/adapters.yaml": ["experts.adapters=[/some/peft_folder]"],
                   "model/hf_local.yaml": ["model.id=org/name", "model.path=/some/model"]}


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


def option_overrides(rel: Path) -> list[str]:
    group, name = str(rel.parent), rel.stem
    if group == ".":
        return []
    if group == "sweep":
        return [f"+sweep={name}"]
    if group.startswith("hydra/"):
        return [f"{group}={name}"]
    return [f"{group}={name}", *GROUP_OVERRIDES.get(str(rel), [])]


@pytest.mark.parametrize("rel", ALL_YAML, ids=str)
def test_yaml_starts_with_usage_line(rel):
    lines = (CONF_DIR / rel).read_text().splitlines()
    first = lines[1] if lines[0].startswith("# @package") else lines[0]  # Hydra needs its header first
    assert first.startswith("# Usage:"), f"{rel}: first line must be '# Usage: ...'"


@pytest.mark.parametrize("rel", ALL_YAML, ids=str)
def test_yaml_composes_and_instantiates(rel):
    group = str(rel.parent)
    profile = [] if group == "profile" else ["profile=smoke"]
    cfg = compose_with(profile + option_overrides(rel))
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["runs_dir"]
    if group == "method":
        assert cfg.method.name == rel.stem
        get_method(cfg.method.name)(cfg.method)
    elif group == "task":
        assert cfg.task.name == rel.stem
        try:
            task = get_task(cfg.task.name)(cfg.task, str(DATA_ROOT) if DATA_ROOT.is_dir() else None)
            subtasks = task.subtasks()
        except DataError:
            if DATA_ROOT.is_dir():
                raise
            pytest.skip(f"task {rel.stem} reads local data: no {DATA_ROOT}")
        assert subtasks
    elif group == "model":
        check_model_config(cfg.model)
    elif group == "experts":
        assert cfg.experts.source in ("train", "adapters", "pools") and cfg.experts.name
        pools = cfg.experts.members.values() if cfg.experts.source == "pools" else [cfg.experts]
        for pool in pools:
            assert pool.source != "train" or (pool.dir and pool.train)
    elif group == "profile":
        assert cfg.profile.name == rel.stem
        check_model_config(cfg.model)


@pytest.mark.parametrize("method,seeded", [("base", False), ("single", False), ("linear", False), ("ties", False),
                                           ("magnitude_prune", False), ("svd", False), ("dare", True),
                                           ("lorahub", True), ("mole", True), ("oracle", True), ("lora_lego", True),
                                           ("lora_switch", False), ("lora_composite", False),
                                           ("knots", False), ("core_space", False), ("tsv", False), ("iso_c", False),
                                           ("iso_cts", False), ("wudi", False), ("della", True),
                                           ("breadcrumbs", False), ("cat", True), ("arrow", False)])
def test_a_job_no_seed_can_change_has_one_key_for_every_seed(method, seeded):
    from bench.run.runner import identity

    def key(*extra):
        cfg = compose_with([f"method={method}", "task=algorithmic", "profile=smoke", *extra])
        return identity(cfg, get_method(method)(cfg.method), get_task("algorithmic")(cfg.task))

    assert (key("seed=0") != key("seed=1")) is seeded
    assert key("seed=0", "experts.n=3") != key("seed=1", "experts.n=3")  # a sampled pool depends on the seed
    assert key("seed=0") != key("seed=0", "task.limit=3")  # anything else still counts
    assert key("seed=0") == key("seed=0", "experts.dir=/elsewhere/pool")  # where the pool lies is not what it is
    assert key("seed=0") == key("seed=0", "paths.runs_dir=/elsewhere/runs")
    if method in ("lora_switch", "lora_composite"):  # seeded once they sample their own experts
        assert key("seed=0", "+method.n=2") != key("seed=1", "+method.n=2")
