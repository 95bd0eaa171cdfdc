"""`python -m bench method=M task=T profile=P [overrides]`: run one job, or a sweep with `-m`."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers
from bench.errors import BenchError
from bench.run.records import RECORD_FILE
from bench.run.sweep_summary import note_job

log = logging.getLogger("bench")
register_resolvers()


def summarize(record: dict) -> str:
    rows = [r for r in record.get("rows", []) if r["subtask"] == "all"]
    parts = [f"{(r['variant'] or record['method'])}: {r['metric']}={r['value']:.4f} (n={r['n']})" for r in rows]
    return "; ".join(parts)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict:
    from bench.run.runner import run

    from bench.run.validate import check_types, reference_config

    hydra_cfg = HydraConfig.get()
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        check_types(cfg, reference_config(dict(hydra_cfg.runtime.choices)))
        record = run(cfg, output_dir, record_input_errors=sweeping)
    except Exception as exc:
        if isinstance(exc, BenchError):
            log.error("%s", exc)
        else:
            log.exception("job failed: %s", exc)
        if not sweeping:
            if isinstance(exc, BenchError):
                if not (output_dir / RECORD_FILE).exists():  # bad input: leave no folder behind
                    shutil.rmtree(output_dir, ignore_errors=True)
                sys.exit(2)
            raise
        note_job(hydra_cfg.sweep.dir, "failed", None, overrides)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    status = "skipped" if record.get("skipped") else record["status"]
    log.info("%s %s/%s seed=%s: %s", status, cfg.method.name, cfg.task.name, cfg.seed, summarize(record))
    if not sweeping:
        from bench.run.job_report import job_report

        print(job_report(record, record.get("_path", output_dir / RECORD_FILE), cfg.paths.runs_dir), flush=True)
    if sweeping:
        note_job(hydra_cfg.sweep.dir, status, record["job_key"], overrides)
    return {"status": status, "job_key": record["job_key"]}
