"""The sweep driver behind `hydra/launcher=slurm` and `slurm_local` (submitit): submits only the cells that still
need a job, one named job each, and survives its jobs.

1. Every cell is composed and planned first (`bench.run.plan`): finished and duplicate cells are skipped
   without a cluster job, invalid ones fail with their error; on Slurm the request is checked against the
   partition's limits (`bench.run.slurm.check_request`) before anything is submitted.
2. Pending cells are submitted one job each, named ``<method>-<task>-s<seed>``, at most `max_in_flight` at a
   time; the signal delay is shortened for short time limits so a job is not signalled before it starts. With
   the local executor and `gpus_per_node`, each job gets its own GPUs (`GpuSlots`): one job per GPU.
3. The driver follows its jobs (result files, then `sacct` or `squeue`) until each has ended. A job that ends
   without a result — cancelled, timed out, preempted, killed — is noted as such in the sweep's ``jobs.jsonl``;
   the sweep goes on, prints its summary (`bench.run.sweep_summary`) and exits 1; re-running it submits only
   what is missing.

The Hydra plugin classes (`hydra_plugins.bench_launcher`) mix `FilteringLaunch` into submitit's launchers.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus

from bench.errors import BenchError, ConfigError
from bench.run.plan import Cell, plan_cells
from bench.run.slurm import FINAL, JobStates, check_request, outcome
from bench.run.sweep_summary import note_job

log = logging.getLogger("bench")

OWN_KEYS = ("accounting", "poll_s", "max_in_flight")  # this driver's parameters, not submitit's
MIN_SIGNAL_S = 10


def signal_delay(timeout_min: int, requested_s: int) -> int:
    """Seconds before the time limit at which submitit signals a job: at most a quarter of the limit, so that
    short limits do not signal a job as it starts."""
    return max(MIN_SIGNAL_S, min(int(requested_s), int(timeout_min) * 60 // 4))


class GpuSlots:
    """The GPUs of this machine handed to local jobs, `per_job` each, so that jobs never share one: a sweep on a
    multi-GPU node runs one job per GPU (Slurm does the same itself through gres)."""

    def __init__(self, devices: list[int], per_job: int) -> None:
        if per_job > len(devices):
            raise ConfigError(f"gpus_per_node={per_job}, but this machine shows {len(devices)} GPU(s) ({devices})")
        self.free, self.per_job = list(devices), per_job
        self.capacity = len(devices) // per_job

    @classmethod
    def from_machine(cls, per_job: int) -> "GpuSlots":
        """GPU ids from CUDA_VISIBLE_DEVICES when set (physical ids, passed on to the jobs), else all of torch's."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            devices = [int(d) for d in visible.split(",") if d.strip()]
        else:
            import torch

            devices = list(range(torch.cuda.device_count()))
        return cls(devices, per_job)

    def take(self) -> tuple[int, ...]:
        taken, self.free = self.free[: self.per_job], self.free[self.per_job:]
        return tuple(taken)

    def give(self, devices: tuple[int, ...]) -> None:
        self.free = sorted(self.free + list(devices))


def finished(cell: Cell, status: str, detail: str = "") -> JobReturn:
    """The JobReturn of a cell that ran no task function here (skipped, or ended without a result)."""
    ret = JobReturn(overrides=cell.overrides, status=JobStatus.COMPLETED)
    ret.return_value = {"status": status, "job_key": cell.job_key, "detail": detail or cell.detail}
    return ret


class FilteringLaunch:
    """`launch` for submitit's Hydra launchers (see the module docstring)."""

    _EXECUTOR: str
    params: dict
    config: Any
    hydra_context: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        loader = self.hydra_context.config_loader
        cells = plan_cells([(initial_job_idx + i, list(o), loader.load_sweep_config(self.config, list(o)))
                            for i, o in enumerate(job_overrides)])
        returns: dict[int, JobReturn] = {}
        for cell in cells:
            if cell.state != "pending":
                status = "failed" if cell.state == "invalid" else "skipped"
                (log.error if status == "failed" else log.info)("#%d %s: %s (%s)", cell.index, cell.name, cell.state,
                                                                 cell.detail)
                note_job(sweep_dir, status, cell.job_key, cell.overrides)
                returns[cell.index] = finished(cell, status)
        pending = [c for c in cells if c.state == "pending"]
        log.info("sweep %s: %d cell(s), %d to submit (%d done, %d duplicate, %d invalid)", sweep_dir, len(cells),
                 len(pending), *(sum(c.state == s for c in cells) for s in ("done", "duplicate", "invalid")))
        if pending:
            try:
                executor = self._executor()
            except BenchError as exc:  # a request the cluster cannot run: say why, submit nothing
                log.error("%s", exc)
                raise SystemExit(2) from None
            returns.update(self._submit_and_follow(executor, pending, sweep_dir))
        return [returns[c.index] for c in cells]

    # --------------------------------------------------------------------------------------------- submission
    def _executor(self):
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = {k: v for k, v in self.params.items() if k not in OWN_KEYS}
        init = {f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params.pop("submitit_folder"), **init)
        if self._EXECUTOR == "slurm":
            part = check_request(params)
            delay = signal_delay(params.get("timeout_min") or 60, params.get("signal_delay_s", 120))
            if delay != params.get("signal_delay_s", 120):
                log.info("signal_delay_s %s -> %d (a quarter of timeout_min=%s)", params.get("signal_delay_s", 120),
                         delay, params.get("timeout_min"))
            params["signal_delay_s"] = delay
            params.pop("array_parallelism", None)  # one job per cell; max_in_flight throttles
            log.info("Slurm partition %s: %d CPUs, %.0f GB, %d GPUs per node, time limit %s min", part.name,
                     part.cpus, part.memory_mb / 1024, part.gpus, part.max_minutes or "none")
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def _submit_and_follow(self, executor, cells: list[Cell], sweep_dir: Path) -> dict[int, JobReturn]:
        from tqdm.auto import tqdm

        limit = int(self.params.get("max_in_flight") or 64)
        per_job = int(self.params.get("gpus_per_node") or 0)
        slots = GpuSlots.from_machine(per_job) if self._EXECUTOR == "local" and per_job else None
        if slots is not None:
            limit = min(limit, slots.capacity)
            log.info("local GPUs %s: %d job(s) at a time, %d GPU(s) each", slots.free, limit, per_job)
        states = JobStates(self.params.get("accounting", "auto")) if self._EXECUTOR == "slurm" else None
        poll_s = float(self.params.get("poll_s") or 5)
        queue, running, returns = list(cells), {}, {}
        self._ended_at, self._known, self._submitted = {}, set(), {}
        bar = tqdm(total=len(cells), desc=f"sweep ({self._EXECUTOR})", unit="job")
        while queue or running:
            while queue and len(running) < limit:
                cell = queue.pop(0)
                gpus = slots.take() if slots is not None else ()
                executor.update_parameters(name=cell.name)
                if gpus:  # submitit's LocalExecutor takes visible_gpus; AutoExecutor does not pass it on
                    executor._executor.update_parameters(visible_gpus=gpus)
                job = executor.submit(self, cell.overrides, "hydra.sweep.dir", cell.index, f"job_id_for_{cell.index}",
                                      Singleton.get_state())
                log.info("#%d %s: submitted as job %s%s", cell.index, cell.name, job.job_id,
                         f" on GPU {','.join(map(str, gpus))}" if gpus else "")
                running[job.job_id] = (cell, job, gpus)
                self._submitted[job.job_id] = time.time()
            seen = states.poll(list(running)) if states is not None else {}
            for job_id, (cell, job, gpus) in list(running.items()):
                ret = self._outcome(cell, job, seen, sweep_dir)
                if ret is not None:
                    returns[cell.index] = ret
                    del running[job_id]
                    if gpus:
                        slots.give(gpus)
                    bar.update(1)
            if running:
                time.sleep(poll_s)
        bar.close()
        return returns

    def _outcome(self, cell: Cell, job, seen: dict[str, str], sweep_dir: Path) -> JobReturn | None:
        """The cell's JobReturn once its job has ended, else None."""
        from submitit.core import utils

        if job.paths.result_pickle.exists():
            kind, value = utils.pickle_load(job.paths.result_pickle)
            if kind == "success":
                return value
            log.error("#%d %s (job %s) failed outside the task function:\n%s", cell.index, cell.name, job.job_id, value)
            note_job(sweep_dir, "failed", cell.job_key, cell.overrides)
            return finished(cell, "failed", str(value).strip().splitlines()[-1] if value else "")
        if self._EXECUTOR == "slurm":
            state = seen.get(job.job_id)
            if state is not None:
                self._known.add(job.job_id)
            # absent from Slurm's answer: ended long ago if we saw it before, or lost if never seen in 2 minutes
            gone = state is None and (job.job_id in self._known or time.time() - self._submitted[job.job_id] > 120)
            over = state in FINAL or gone
        else:
            over, state = job.done(), job.state
        if not over:
            return None
        first = self._ended_at.setdefault(job.job_id, time.time())
        if time.time() - first < 10:  # the result file may lag the state on a shared file system
            return None
        status = outcome(state or "UNKNOWN")
        log.error("#%d %s (job %s) ended without a result: %s", cell.index, cell.name, job.job_id, state or "gone")
        note_job(sweep_dir, status, cell.job_key, cell.overrides)
        return finished(cell, status, f"state {state or 'unknown'}")
