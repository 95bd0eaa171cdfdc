"""`python -m bench method=M task=T profile=P [overrides]`: run one job, or a sweep with `-m`."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers
from bench.errors import BenchError
from bench.sweep_summary import note_job

log = logging.getLogger("bench")
register_resolvers()


def summarize(record: dict) -> str:
    rows = [r for r in record.get("rows", []) if r["subtask"] == "all"]
    parts = [f"{(r['variant'] or record['method'])}: {r['metric']}={r['value']:.4f} (n={r['n']})" for r in rows]
    return "; ".join(parts)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict:
    from bench.runner import run

    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        record = run(cfg, hydra_cfg.runtime.output_dir, record_input_errors=sweeping)
    except Exception as exc:
        if isinstance(exc, BenchError):
            log.error("%s", exc)
        else:
            log.exception("job failed: %s", exc)
        if not sweeping:
            if isinstance(exc, BenchError):
                sys.exit(2)
            raise
        note_job(hydra_cfg.sweep.dir, "failed", None, overrides)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    status = "skipped" if record.get("skipped") else record["status"]
    log.info("%s %s/%s seed=%s: %s", status, cfg.method.name, cfg.task.name, cfg.seed, summarize(record))
    if sweeping:
        note_job(hydra_cfg.sweep.dir, status, record["job_key"], overrides)
    return {"status": status, "job_key": record["job_key"]}
