"""One benchmark job: load the model, the pool and the task, let the method compose, score, write a record.

Order of work:
1. `prepare` validates everything cheap (method and task names and hyperparameters, domains) — a bad input
   raises `BenchError` before anything is loaded or written.
2. `find_records` skips a job whose record exists with status ok (unless `force=true`): same config and same
   input digests (`bench.run.inputs`); when only the inputs differ from an earlier record, the log says which.
3. A record with status "running" is written, then `execute` runs unit by unit, logging each finished unit
   (`bench.run.resume`): an attempt that was killed or failed leaves its finished units to the next run of the
   same job, which takes them instead of redoing them. A failure writes a record with status "failed" and the
   error (see `run`), so a sweep goes on and a re-run retries only that job.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig

from bench.errors import BenchError, ConfigError
from bench.files import write_json_atomic
from bench.run.records import (
    RECORD_FILE, code_digest, find_records, git_sha, hardware, input_key, iter_records, job_config, job_key,
    library_versions,
)
from bench.registry import get_method, get_task
from bench.run.resume import UnitLog, finished_units, unit_count
from bench.run.tracking import log_record
from methods.base import Composed, FitContext, Method, Timer
from tasks.base import Task

log = logging.getLogger("bench")


def prepare(cfg: DictConfig) -> tuple[Method, Task]:
    """Method and task objects, validated; raises `BenchError` for bad input and touches no file."""
    from bench.run.validate import check_values

    check_values(cfg)
    method = get_method(cfg.method.name)(cfg.method)
    task = get_task(cfg.task.name)(cfg.task, cfg.paths.get("data_root"))
    if task.domain not in method.domains:
        raise ConfigError(f"method {cfg.method.name!r} supports {list(method.domains)}, not the {task.domain!r} task {cfg.task.name!r}")
    if task.samples_experts() and cfg.experts.get("n") is not None:
        raise ConfigError(f"task {cfg.task.name!r} draws each unit's experts itself; set experts.n=null "
                          f"(got experts.n={cfg.experts.n})")
    task.subtasks()  # unknown subtasks fail here
    task.check_data()  # a data root that does not hold the task's files fails here
    return method, task


def identity(cfg: DictConfig, method: Method, task: Task) -> str:
    """The job's key: without the seed when no seed can change the result (a method that does not use it,
    on the whole pool; a sampled pool, ``experts.n`` or a task that samples each unit's experts, depends on the
    seed), so a sweep over seeds runs such a job once and skips it for the other seeds."""
    sampled = cfg.experts.get("n") is not None or task.samples_experts()
    return job_key(cfg, seeded=method.uses_seed() or sampled)


def run(cfg: DictConfig, output_dir: str | Path, record_input_errors: bool = False) -> dict:
    """Run (or skip) the job `cfg`; return its record.

    A bad input found while loading (a missing or corrupt adapter, adapters of another base model) raises
    `BenchError` and leaves no record, unless `record_input_errors` (sweeps: every failed job leaves a record
    so the sweep summary and the next re-run see it) or units had finished (kept for resuming). Any other failure
    always writes a failed record; a killed job leaves its record at status running. Either way the next run of
    the job takes the units it finished (`bench.run.resume`; not with ``force=true``).
    """
    from bench.run.inputs import changed, describe, job_inputs

    method, task = prepare(cfg)
    config_key = identity(cfg, method, task)
    inputs = job_inputs(cfg, task)
    key = input_key(config_key, inputs)
    runs_dir = Path(cfg.paths.runs_dir)
    known = list(iter_records(runs_dir))  # one pass over the runs folder: done jobs and unfinished attempts
    if not cfg.get("force", False):
        found = find_records(known, {"job_key": key, "config_key": config_key})
        done, earlier = found["job_key"], found["config_key"]
        if done is not None:
            log.info("skip: job %s already done (%s); force=true re-runs it", key, done["_path"])
            return {**done, "skipped": True}
        if earlier is not None:
            what = describe(changed(earlier.get("inputs", {}), inputs))
            log.info("re-running job %s: %s changed since %s", config_key, what, earlier["_path"])
    output_dir = Path(output_dir)
    resumed_from, carried = (None, {}) if cfg.get("force", False) else finished_units(known, key)
    record = {
        "job_key": key, "config_key": config_key, "inputs": inputs, "status": "running", "profile": cfg.profile.name, "method": cfg.method.name,
        "method_params": method.params(), "task": cfg.task.name, "domain": task.domain,
        "model": cfg.model.id, "experts_pool": cfg.experts.name, "seed": int(cfg.seed),
        "meaningful": bool(cfg.profile.meaningful), "git_sha": git_sha(), "code_digest": code_digest(),
        "versions": library_versions(),
        "config": job_config(cfg), "started_at": _now(),
    }
    if carried:
        log.info("resuming job %s: %d finished unit(s) from %s", key, len(carried), resumed_from)
        record["resumed_units"] = {"from": resumed_from, "units": sorted(carried)}
    write_json_atomic(output_dir / RECORD_FILE, record)  # status running: a killed attempt is resumable
    try:
        record.update(execute(cfg, method, task, output_dir, carried, resumed_from))
        record["status"] = "ok"
        after = job_inputs(cfg, task)  # a pool this job trained is part of its key from now on
        if after != inputs:
            record.update(inputs=after, job_key=input_key(config_key, after))
    except Exception as exc:  # the job failed: record it (see `run`), re-raise for the CLI to report
        if record_input_errors or not isinstance(exc, BenchError) or unit_count(output_dir):
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            record["finished_at"] = _now()
            write_json_atomic(output_dir / RECORD_FILE, record)
        else:  # a bad input found while loading leaves no record
            (output_dir / RECORD_FILE).unlink(missing_ok=True)
        raise
    record["finished_at"] = _now()
    write_json_atomic(output_dir / RECORD_FILE, record)
    log_record(cfg, record)
    return record


def execute(cfg: DictConfig, method: Method, task: Task, output_dir: Path,
            carried: dict[str, dict] | None = None, carried_from: str | None = None) -> dict:
    """Fit and score every unit of `task` (units in `carried`, finished by the earlier attempt in `carried_from`,
    are taken from it, with the files they wrote there; each unit finished here is logged to the folder's units
    file as it ends: `bench.run.resume`)."""
    from bench.experts.pools import load_pool

    device = _reset_peak_memory(cfg.device)
    with Timer() as load_timer:
        model = load_model(cfg)
        pool = load_pool(cfg.experts, model, cfg.paths.get("data_root")).sample(cfg.experts.get("n"), int(cfg.seed))
    if hasattr(task, "output_dir"):
        task.output_dir = output_dir
    carried = carried or {}
    unit_log = UnitLog(output_dir, carried)
    rows, predictions = [], []
    for unit in task.fit_units():
        # drawn for every unit, carried ones too: the task's record info (e.g. each unit's experts) stays whole
        fit = task.fit_examples(int(cfg.fit_examples), int(cfg.seed), unit) if cfg.fit_examples else []
        # a DreamBooth set composes its subjects; a cross-task unit, the experts of other task families
        unit_pool = task.unit_pool(unit, pool, int(cfg.seed))
        ctx = FitContext(model=model, pool=unit_pool, fit_examples=fit, seed=int(cfg.seed), prompt=task.prompt,
                         score=lambda composed, examples: task.score_examples(composed, examples)[0],
                         unit="+".join(unit))
        if ctx.unit in carried:
            rows += carried[ctx.unit]["rows"]
            predictions += carried[ctx.unit]["predictions"]
            variants = list(dict.fromkeys(r.get("variant") or "" for r in carried[ctx.unit]["rows"]))
            files = task.unit_artifacts(unit, variants) + [_composed_path(ctx.unit, v) for v in variants
                                                           if cfg.get("save_composed", False)]
            copy_files(Path(carried_from), output_dir, files)
            continue
        unit_rows, unit_predictions = [], []
        for composed in method.compose(ctx):
            with Timer() as eval_timer:
                scores, preds = task.evaluate(composed, unit)
            report = composed.report
            for score in scores:
                unit_rows.append({"variant": composed.variant, **asdict(score), "unit": ctx.unit,
                                  "fit_examples": report.examples, "fit_steps": report.steps,
                                  "fit_seconds": report.seconds, "eval_seconds": eval_timer.seconds,
                                  "trained_params": report.trained_params, "fit_info": report.info})
            unit_predictions.extend({"variant": composed.variant, **p} for p in preds)
            _save_composed(cfg, composed, output_dir, ctx.unit)
        unit_log.add(ctx.unit, unit_rows, unit_predictions)
        rows += unit_rows
        predictions += unit_predictions
    rows.extend(macro_rows(rows))
    _write_predictions(output_dir, predictions)
    return {
        "rows": rows, "experts": pool.names, "n_experts": len(pool),
        "task_info": task.record_info() if hasattr(task, "record_info") else {},
        "device": str(device), "hardware": hardware(device), "load_seconds": load_timer.seconds,
        "peak_memory_mb": _peak_memory_mb(device),
    }


def load_model(cfg: DictConfig):
    """The base model of `cfg.model`: a `LanguageModel` or, for `kind: diffusion`, a diffusion model."""
    cache_dir = Path(cfg.paths.cache_dir)
    if cfg.model.kind == "diffusion":
        from bench.models.diffusion import load_diffusion_model

        return load_diffusion_model(cfg.model, cache_dir, cfg.device)
    from bench.models.loading import load_language_model

    lm = load_language_model(cfg.model, cache_dir, cfg.device)
    generation = cfg.get("generation") or {}
    lm.token_budget = generation.get("token_budget")
    lm.max_rows = generation.get("max_rows")
    lm.legacy_batch = generation.get("legacy_batch")
    lm.cuda_graphs = generation.get("cuda_graphs", True)
    return lm


def macro_rows(rows: list[dict]) -> list[dict]:
    """Per variant and metric: the macro average over subtasks (subtask "all"), with summed costs."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["metric"]), []).append(row)
    out = []
    for (variant, metric), group in groups.items():
        units = {r["unit"]: r for r in group}  # one fit per unit: count its cost once
        out.append({
            "variant": variant, "subtask": "all", "metric": metric, "unit": "all",
            "value": sum(r["value"] for r in group) / len(group), "n": sum(r["n"] for r in group),
            "fit_examples": sum(r["fit_examples"] for r in units.values()),
            "fit_steps": sum(r["fit_steps"] for r in units.values()),
            "fit_seconds": sum(r["fit_seconds"] for r in units.values()),
            "eval_seconds": sum(r["eval_seconds"] for r in group),
            "trained_params": max(r["trained_params"] for r in group), "fit_info": {},
        })
    return out


def _composed_path(unit: str, variant: str) -> str:
    """Where `save_composed` writes a unit's composed model (relative to the run folder)."""
    return "composed/" + ("_".join(filter(None, [unit, variant])).replace("/", "-").replace("=", "-") or "composed")


def _save_composed(cfg: DictConfig, composed: Composed, output_dir: Path, unit: str) -> None:
    if cfg.get("save_composed", False):
        composed.save(output_dir / _composed_path(unit, composed.variant))


def copy_files(source: Path, target: Path, relative: list[str]) -> None:
    """Copy these files or folders (paths relative to both run folders) from `source` into `target`; the ones the
    earlier attempt did not write are skipped."""
    for rel in dict.fromkeys(relative):
        src, dst = source / rel, target / rel
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _write_predictions(output_dir: Path, predictions: list[dict]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / "predictions.jsonl.tmp"
    with tmp.open("w") as f:
        for p in predictions:
            f.write(json.dumps(p, default=str) + "\n")
    tmp.replace(output_dir / "predictions.jsonl")


def _reset_peak_memory(device_name: str) -> torch.device:
    from bench.models.loading import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return device


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

