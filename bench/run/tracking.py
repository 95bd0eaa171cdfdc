"""Optional wandb logging: one run per job with its config and scores (`wandb.mode`: disabled by default)."""

from __future__ import annotations

from omegaconf import DictConfig

MODES = ("disabled", "offline", "online")


def log_record(cfg: DictConfig, record: dict) -> None:
    wb = cfg.get("wandb") or {}
    mode = wb.get("mode", "disabled")
    if mode not in MODES:
        from bench.errors import ConfigError

        raise ConfigError(f"wandb.mode={mode!r}; choose one of {MODES}")
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=wb.get("project"), entity=wb.get("entity"), mode=mode, config=record["config"], reinit="finish_previous",
        name=f"{record['profile']}/{record['task']}/{record['method']}/seed{record['seed']}", group=record["job_key"],
        dir=cfg.paths.runs_dir,
    )
    summary = {f"{r['variant'] or 'main'}/{r['subtask']}/{r['metric']}": r["value"] for r in record["rows"]}
    run.summary.update({**summary, "status": record["status"], "peak_memory_mb": record["peak_memory_mb"]})
    run.finish()
