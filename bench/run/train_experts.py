"""`python -m bench.run.train_experts profile=P [experts=..]` (`make experts PROFILE=P`): train the experts of the
profile's pool that are missing or stale (per expert: see `bench.experts.manifest`); current ones are kept
(`force=true` retrains every expert; `rescore=true` only scores a complete pool's experts again, with the current
``manifest_eval_limit``; `+shards=N` trains in N processes at once, on the visible GPUs in turn). A joined pool
(``source: pools``) trains each member. Each expert is reported with its paired test against the base model: an expert whose
one-sided McNemar p-value is not below `CLEAR_MARGIN_P` does not beat the base by a clear margin (a warning)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers
from bench.errors import ConfigError
from bench.experts.manifest import MANIFEST
from bench.files import exclusive

log = logging.getLogger("bench")
CLEAR_MARGIN_P = 0.01
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.experts.pools import load_pool, member_configs, rescore_pool
    from bench.run.runner import load_model

    pools = list(member_configs(cfg.experts).values()) or [cfg.experts]
    if cfg.get("rescore") and any(p.get("domain", "nlp") == "vl" for p in pools):
        raise ConfigError(f"rescore=true scores language-model pools; {cfg.experts.name!r} is a DreamBooth pool")
    shard = parse_shard(cfg.get("shard"))
    shards = int(cfg.get("shards") or 1)
    if shards > 1 and shard is None:
        if any(p.get("domain", "nlp") == "vl" for p in pools):
            raise ConfigError(f"+shards={shards} trains language-model pools; {cfg.experts.name!r} is a DreamBooth pool")
        train_sharded([p for p in pools if p.source == "train"], shards)
        return
    model = load_model(cfg)
    data_root = cfg.paths.get("data_root")
    for pool in pools:
        if pool.source != "train":
            log.info("experts %s are given as adapters; nothing to train", pool.name)
        elif pool.get("domain", "nlp") == "vl":
            load_pool(pool, model, data_root)  # trains what is missing
        elif cfg.get("rescore"):
            report(rescore_pool(pool, model, data_root), started=None)
        elif shard is not None:  # one process of `shards=N`, which holds the pool's lock and reports
            train_pool_slice(cfg, pool, model, data_root, shard)
        else:
            with exclusive(Path(pool.dir), f"training expert pool {pool.name}"):
                train_whole_pool(cfg, pool, model, data_root)


def train_whole_pool(cfg: DictConfig, pool: DictConfig, model, data_root: str | None) -> None:
    from bench.experts.manifest import pool_problem
    from bench.experts.pools import train_pool

    problem = "force=true" if cfg.force else pool_problem(pool, model, data_root)
    if problem is None:
        log.info("expert pool %s is complete at %s; nothing to do", pool.name, pool.dir)
        return
    log.info("training expert pool %s (%s)", pool.name, problem)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    report(train_pool(pool, model, data_root, force=bool(cfg.force)), started)


def parse_shard(value) -> tuple[int, int] | None:
    """``shard=i/n`` -> (i, n), 0 <= i < n; None when unset."""
    if value is None:
        return None
    try:
        index, count = (int(x) for x in str(value).split("/"))
    except ValueError:
        raise ConfigError(f"shard={value!r}: write it as i/n (e.g. shard=0/4)") from None
    if not 0 <= index < count:
        raise ConfigError(f"shard={value!r}: need 0 <= i < n")
    return index, count


def train_pool_slice(cfg: DictConfig, pool: DictConfig, model, data_root: str | None, shard: tuple[int, int]) -> None:
    """Train shard i of n of the pool: every n-th expert from the i-th on, in pool order."""
    from bench.experts.manifest import expert_names
    from bench.experts.pools import train_pool

    index, count = shard
    names = set(expert_names(pool)[index::count])
    train_pool(pool, model, data_root, force=bool(cfg.force), only=names)


def train_sharded(pools: list[DictConfig], shards: int) -> None:
    """``shards=N``: train the pools in N processes at once, each a slice of every pool (``shard=i/N``), on the
    visible GPUs in turn (with fewer GPUs than processes they share them) and with the CPU cores split between
    them (OMP_NUM_THREADS, unless set); the pools' locks are held meanwhile, so jobs that need them wait."""
    import os
    import subprocess
    from contextlib import ExitStack

    import torch

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    gpus = torch.cuda.device_count()
    args = [a for a in sys.argv[1:] if not a.startswith(("shards=", "+shards="))]
    with ExitStack() as stack:
        for pool in pools:
            stack.enter_context(exclusive(Path(pool.dir), f"training expert pool {pool.name}"))
        procs = []
        for i in range(shards):
            env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // shards)), **os.environ,
                   **({"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else {})}
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.run.train_experts", *args,
                                           f"+shard={i}/{shards}"], env=env))
        failed = [i for i, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise SystemExit(f"expert training shards {failed} of {shards} failed (see their output above); "
                         "run the same command again: finished experts are kept")
    for pool in pools:
        manifest = Path(pool.dir) / MANIFEST
        if manifest.is_file():
            report(json.loads(manifest.read_text()), started)
    log.info("trained %s in %d processes", [p.name for p in pools], shards)


def report(manifest: dict, started: str | None) -> None:
    """One line per expert (base -> expert, paired p-value; trained now or kept, or rescored when `started` is
    None); a warning for each expert that does not beat the base by a clear margin."""
    for row in manifest["experts"]:
        status = "rescored" if started is None else "trained" if row.get("created", "") >= started else "kept"
        p = row.get("p_beats_base")
        log.info("  %-22s base %.3f -> expert %.3f (n=%d, p=%s, %.0fs, %s)", row["name"], row["base_score"],
                 row["expert_score"], row["n_eval"], "?" if p is None else f"{p:.2g}", row["seconds"], status)
        if p is not None and p >= CLEAR_MARGIN_P:
            log.warning("expert %s does not beat the base model by a clear margin (p=%.2g >= %g)", row["name"], p,
                        CLEAR_MARGIN_P)


if __name__ == "__main__":
    main()
