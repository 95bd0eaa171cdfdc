"""What the sweep driver asks Slurm: a partition's limits (checked before submitting) and the states of its jobs
(`sacct` when accounting answers, `squeue` otherwise, so a cluster without accounting still shows a job's end)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

from bench.errors import ConfigError

log = logging.getLogger("bench")

# Slurm job states that end a job (a preempted or timed-out job that submitit requeues goes back to PENDING)
FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
# the sweep summary's word for a job that ended without a result, by its final Slurm state
OUTCOME = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "PREEMPTED": "preempted", "DEADLINE": "timeout",
           "INTERRUPTED": "cancelled"}  # INTERRUPTED: submitit's local executor


def outcome(state: str) -> str:
    """`cancelled`, `timeout`, `preempted`, or `failed` for a job that ended without writing its result."""
    return OUTCOME.get(state, "failed")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _need(command: str) -> None:
    if shutil.which(command) is None:
        raise ConfigError(f"`{command}` not found: hydra/launcher=slurm submits from a Slurm login node "
                          "(hydra/launcher=slurm_local runs the same code path on this machine)")


@dataclass
class Partition:
    name: str
    cpus: int               # CPUs of its largest node
    memory_mb: int          # memory of its largest node
    gpus: int               # GPUs (gres gpu) of its largest node
    max_minutes: int | None  # None: no time limit


def _minutes(limit: str) -> int | None:
    """Slurm's time format ([days-]hours:minutes:seconds, minutes, infinite) in minutes."""
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[-3:]
    return (int(days) if days else 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def _gpus(gres: str) -> int:
    """GPUs in a gres string such as ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def partition(name: str | None) -> Partition:
    """The named partition (the default one when None) as `sinfo` describes it; a clear error when unknown."""
    _need("sinfo")
    out = _run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"])
    if out.returncode != 0:
        raise ConfigError(f"sinfo failed: {out.stderr.strip()}")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    names = sorted({r[0].rstrip("*") for r in rows})
    if name is None:
        defaults = [r[0].rstrip("*") for r in rows if r[0].endswith("*")]
        if not defaults:
            raise ConfigError(f"no default Slurm partition; set hydra.launcher.partition to one of {names}")
        name = defaults[0]
    mine = [r for r in rows if r[0].rstrip("*") == name]
    if not mine:
        raise ConfigError(f"hydra.launcher.partition={name!r} is not a Slurm partition here; partitions: {names}")
    limits = [_minutes(r[4]) for r in mine]
    return Partition(name, max(int(r[1].rstrip("+")) for r in mine), max(int(r[2].rstrip("+")) for r in mine),
                     max(_gpus(r[3]) for r in mine), None if None in limits else max(limits))


def check_request(params: dict) -> Partition:
    """Refuse, before anything is submitted, a request the partition cannot ever satisfy (it would pend
    forever): CPUs, memory, GPUs per node and time, each named with what the partition has."""
    part = partition(params.get("partition"))
    cpus = int(params.get("cpus_per_task") or 1) * int(params.get("tasks_per_node") or 1)
    gpus = int(params.get("gpus_per_node") or 0) or int(params.get("gpus_per_task") or 0) * int(
        params.get("tasks_per_node") or 1)
    problems = []
    if cpus > part.cpus:
        problems.append(f"{cpus} CPUs per node (cpus_per_task × tasks_per_node), the largest node has {part.cpus}")
    if params.get("mem_gb") and int(params["mem_gb"]) * 1024 > part.memory_mb:
        problems.append(f"mem_gb={params['mem_gb']}, the largest node has {part.memory_mb / 1024:.1f} GB")
    if gpus > part.gpus:
        problems.append(f"{gpus} GPUs per node, the partition's nodes have {part.gpus}"
                        + (" (leave gpus_per_node unset for CPU jobs)" if part.gpus == 0 else ""))
    if part.max_minutes is not None and int(params.get("timeout_min") or 0) > part.max_minutes:
        problems.append(f"timeout_min={params['timeout_min']}, the partition's limit is {part.max_minutes} min")
    if problems:
        raise ConfigError(f"Slurm partition {part.name!r} cannot run these jobs: " + "; ".join(problems)
                          + " (set hydra.launcher.<key>=… to fit)")
    return part


class JobStates:
    """The current states of submitted jobs. `accounting`: "auto" (sacct while it answers, then squeue),
    True (sacct only) or False (squeue only: clusters without slurmdbd)."""

    def __init__(self, accounting: bool | str = "auto") -> None:
        self.use_sacct = accounting in (True, "auto", "true")
        self.strict = accounting in (True, "true")

    def poll(self, job_ids: list[str]) -> dict[str, str]:
        """`{job id: state}` for the jobs Slurm still knows; a job absent from the answer has ended long ago
        (squeue forgets finished jobs after MinJobAge) or never started."""
        if not job_ids:
            return {}
        if self.use_sacct:
            out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)])
            if out.returncode == 0:
                return self._parse(out.stdout)
            if self.strict:
                raise RuntimeError(f"sacct failed: {out.stderr.strip()}")
            log.info("sacct does not answer (%s): following jobs with squeue", out.stderr.strip() or out.returncode)
            self.use_sacct = False
        out = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(job_ids)])
        return self._parse(out.stdout) if out.returncode == 0 else {}

    @staticmethod
    def _parse(text: str) -> dict[str, str]:
        states = {}
        for line in text.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                states[job.strip()] = state.split()[0].strip() if state.strip() else "UNKNOWN"
        return states
