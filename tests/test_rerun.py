"""A leaderboard row's command re-runs that row: composing the config from the command's own overrides gives back
the record's method, task and profile sections, whatever was overridden when the job ran."""

from __future__ import annotations

import shlex

import pytest
from omegaconf import OmegaConf

from bench.analysis.rerun import command
from bench.config import compose_config

SECTIONS = ("method", "task", "profile")


def record_of(overrides: list[str]) -> dict:
    """The fields of a run record that `command` reads, from a config composed with `overrides`."""
    cfg = compose_config(overrides)
    config = {s: OmegaConf.to_container(cfg[s], resolve=True) for s in ("method", "task", "profile", "experts")}
    return {"method": cfg.method.name, "task": cfg.task.name, "profile": cfg.profile.name,
            "method_params": config["method"], "config": {**config, "fit_examples": cfg.fit_examples}}


def sections_of(cmd: str) -> dict:
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "bench"]
    cfg = compose_config(argv[3:])
    return {s: OmegaConf.to_container(cfg[s], resolve=True) for s in SECTIONS}


@pytest.mark.parametrize("overrides, expected", [
    (["method=breadcrumbs", "method.normalize=true", "task=bbh_cross", "experts=cross_bbh", "profile=full"],
     ["method.normalize=true"]),
    (["method=mole", "task=bbh_cross", "experts=cross_bbh", "profile=full", "profile.gate_steps=20",
      "task.subtasks=[navigate,word_sorting]"],
     ["profile.gate_steps=20", "method.steps=20", "task.subtasks=[navigate,word_sorting]"]),
    (["method=lorahub", "method.budget=80", "task=algorithmic", "profile=local", "task.limit=7"],
     ["method.budget=80", "task.limit=7"]),
    (["method=linear", "method.weights=[0.5,0.25,0.25,0,0]", "task=algorithmic", "profile=smoke",
      "task.prompt_template='Question: {input} => answer, please:'"],
     ["method.weights=[0.5,0.25,0.25,0,0]"]),
])
def test_command_reproduces_the_recorded_sections(overrides, expected):
    record = record_of(overrides)
    cmd = command(record)
    for part in expected:
        assert part in shlex.split(cmd), (part, cmd)
    assert sections_of(cmd) == {s: (record["method_params"] if s == "method" else record["config"][s])
                                for s in SECTIONS}


def test_defaults_add_nothing_beyond_the_named_options():
    record = record_of(["method=ties", "task=bbh_cross", "experts=cross_bbh", "profile=full"])
    assert shlex.split(command(record))[3:] == ["method=ties", "task=bbh_cross", "profile=full", "experts=cross_bbh",
                                           "fit_examples=5"]


def test_a_method_this_checkout_lacks_gives_the_named_options_only():
    record = record_of(["method=ties", "task=algorithmic", "profile=smoke"])
    record["method"] = "no_such_method"
    record["method_params"] = {**record["method_params"], "name": "no_such_method", "extra": 3}
    assert command(record).split()[3] == "method=no_such_method"
    assert not any(p.startswith("method.") for p in command(record).split())


def test_locations_on_disk_stay_out_of_the_command():
    """A cache folder recorded in the config (DreamBooth's CLIP cache) is the machine's, not the row's: the command is
    the same in any checkout, so the committed tables rebuild byte for byte in a clone at another path."""
    record = record_of(["method=linear", "task=dreambooth", "profile=smoke_vl", "experts=smoke_dreambooth"])
    record["config"]["task"]["clip"]["cache_dir"] = "/some/other/checkout/.cache"
    assert "cache_dir" not in command(record)
    record["config"]["task"]["clip"]["batch_size"] = 7
    assert "task.clip.batch_size=7" in shlex.split(command(record))
