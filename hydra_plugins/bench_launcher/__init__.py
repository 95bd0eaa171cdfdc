"""Hydra finds launcher plugins only under `hydra_plugins`: these classes are submitit's launchers with the
project's sweep driver (`bench.run.launcher.FilteringLaunch`), and their configs add the driver's keys.

hydra-submitit-launcher is an optional extra (``.[all]``): without it this module defines nothing (Hydra scans it
on every run and would otherwise print an import error each time), and `python -m bench` refuses
``hydra/launcher=slurm`` with the package to install (`bench.run.validate.check_launcher`)."""


from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:
    SUBMITIT = False
else:
    SUBMITIT = True

if SUBMITIT:
    from bench.run.launcher import FilteringLaunch

    class BenchSlurmLauncher(FilteringLaunch, SlurmLauncher):
        """submitit_slurm, one filtered, named job per pending cell."""

    class BenchLocalLauncher(FilteringLaunch, LocalLauncher):
        """submitit_local with the same driver: the cluster code path on one machine."""

    @dataclass
    class DriverConf:
        accounting: Any = "auto"   # auto: sacct while it answers, else squeue | true | false (no slurmdbd)
        poll_s: float = 5.0        # seconds between looks at the jobs
        max_in_flight: int = 64    # jobs submitted and not yet ended, at most

    @dataclass
    class BenchSlurmConf(DriverConf, SlurmQueueConf):
        _target_: str = "hydra_plugins.bench_launcher.BenchSlurmLauncher"

    @dataclass
    class BenchLocalConf(DriverConf, LocalQueueConf):
        _target_: str = "hydra_plugins.bench_launcher.BenchLocalLauncher"

    ConfigStore.instance().store(group="hydra/launcher", name="bench_slurm", node=BenchSlurmConf, provider="bench")
    ConfigStore.instance().store(group="hydra/launcher", name="bench_local", node=BenchLocalConf, provider="bench")
