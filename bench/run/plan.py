"""Which cells of a sweep still need a job, decided in the sweep's driver before anything is submitted.

A cell is one override list of a Hydra multirun. It is `done` when an ok record with its job key (config and
input digests, as `bench.run.runner.run` computes it) exists, a `duplicate` when an earlier cell of the same
sweep is the same job (a seed-free method over several seeds has one config key), `invalid` when its config
fails the cheap checks (`runner.prepare`), and `pending` otherwise. Only pending cells cost a cluster job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bench.errors import BenchError

STATES = ("pending", "done", "duplicate", "invalid")


@dataclass
class Cell:
    index: int
    overrides: list[str]
    name: str                   # <method>-<task>-s<seed>: the cluster job's name
    state: str = "pending"
    config_key: str | None = None
    job_key: str | None = None
    detail: str = ""            # why a cell is not pending


def job_name(cfg: DictConfig) -> str:
    return f"{cfg.method.name}-{cfg.task.name}-s{cfg.seed}"


def _job_cfg(cfg: DictConfig) -> DictConfig:
    """The config a job's task function sees: the composed sweep config without its `hydra` node."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return OmegaConf.create(data)


def ok_job_keys(runs_dir: str | Path) -> set[str]:
    from bench.run.records import iter_records

    return {r["job_key"] for r in iter_records(runs_dir) if r.get("status") == "ok"}


def plan_cells(configs: list[tuple[int, list[str], DictConfig]]) -> list[Cell]:
    """The state of each (index, overrides, composed config) cell, in order."""
    from bench.run.inputs import job_inputs
    from bench.run.records import input_key
    from bench.run.runner import identity, prepare

    done_by_dir: dict[str, set[str]] = {}
    first_of: dict[str, int] = {}
    cells = []
    for index, overrides, composed in configs:
        cfg = _job_cfg(composed)
        cell = Cell(index, list(overrides), job_name(cfg))
        cells.append(cell)
        try:
            method, task = prepare(cfg)
            cell.config_key = identity(cfg, method, task)
            cell.job_key = input_key(cell.config_key, job_inputs(cfg, task))
        except BenchError as exc:
            cell.state, cell.detail = "invalid", str(exc)
            continue
        runs_dir = str(cfg.paths.runs_dir)
        if runs_dir not in done_by_dir:
            done_by_dir[runs_dir] = ok_job_keys(runs_dir)
        if not cfg.get("force", False) and cell.job_key in done_by_dir[runs_dir]:
            cell.state, cell.detail = "done", f"job {cell.job_key} already has an ok record"
            continue
        if cell.config_key in first_of:
            cell.state, cell.detail = "duplicate", f"the same job as #{first_of[cell.config_key]}"
            continue
        first_of[cell.config_key] = index
    return cells
