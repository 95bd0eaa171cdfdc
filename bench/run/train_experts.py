"""`python -m bench.run.train_experts profile=P [experts=..]` (`make experts PROFILE=P`): train the experts of the
profile's pool that are missing or stale (per expert: see `bench.experts.manifest`); current ones are kept
(`force=true` retrains every expert; `rescore=true` only scores a complete pool's experts again, with the current
``manifest_eval_limit``). Each expert is reported with its paired test against the base model: an expert whose
one-sided McNemar p-value is not below `CLEAR_MARGIN_P` does not beat the base by a clear margin (a warning)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers
from bench.errors import ConfigError
from bench.files import exclusive

log = logging.getLogger("bench")
CLEAR_MARGIN_P = 0.01
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.experts.manifest import pool_problem
    from bench.experts.pools import load_pool, rescore_pool, train_pool
    from bench.run.runner import load_model

    if cfg.get("rescore") and cfg.experts.get("domain", "nlp") == "vl":
        raise ConfigError(f"rescore=true scores language-model pools; {cfg.experts.name!r} is a DreamBooth pool")
    model = load_model(cfg)
    data_root = cfg.paths.get("data_root")
    if cfg.experts.source != "train":
        log.info("experts %s are given as adapters; nothing to train", cfg.experts.name)
        return
    if cfg.experts.get("domain", "nlp") == "vl":
        load_pool(cfg.experts, model, data_root)  # trains what is missing
        return
    if cfg.get("rescore"):
        report(rescore_pool(cfg.experts, model, data_root), started=None)
        return
    with exclusive(Path(cfg.experts.dir), f"training expert pool {cfg.experts.name}"):
        problem = "force=true" if cfg.force else pool_problem(cfg.experts, model, data_root)
        if problem is None:
            log.info("expert pool %s is complete at %s; nothing to do", cfg.experts.name, cfg.experts.dir)
            return
        log.info("training expert pool %s (%s)", cfg.experts.name, problem)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest = train_pool(cfg.experts, model, data_root, force=bool(cfg.force))
    report(manifest, started)


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
