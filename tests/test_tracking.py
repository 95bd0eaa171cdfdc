"""wandb logging: disabled by default, one offline run per job when asked, bad modes refused."""

import pytest
from omegaconf import OmegaConf

from bench.errors import ConfigError
from bench.run.tracking import log_record

RECORD = {"config": {"method": {"name": "linear"}}, "profile": "smoke", "task": "algorithmic", "method": "linear",
          "seed": 0, "job_key": "abc", "status": "ok", "peak_memory_mb": 1.0,
          "rows": [{"variant": "", "subtask": "all", "metric": "exact_match", "value": 0.5}]}


def cfg(tmp_path, mode):
    return OmegaConf.create({"wandb": {"mode": mode, "project": "p", "entity": None}, "paths": {"runs_dir": str(tmp_path)}})


def test_disabled_writes_nothing(tmp_path):
    log_record(cfg(tmp_path, "disabled"), RECORD)
    assert not any(tmp_path.iterdir())


def test_offline_run_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_record(cfg(tmp_path, "offline"), RECORD)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_bad_mode(tmp_path):
    with pytest.raises(ConfigError, match="wandb.mode"):
        log_record(cfg(tmp_path, "sometimes"), RECORD)
