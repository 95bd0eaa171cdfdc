"""`python -m bench.train_experts profile=P [experts=..]` (`make experts PROFILE=P`): train the experts of the
profile's pool that are missing or stale (per expert: see `bench.pool_manifest`); current ones are kept
(`force=true` retrains every expert)."""

from __future__ import annotations

import logging
import time

import hydra
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers

log = logging.getLogger("bench")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.experts import load_pool, train_pool
    from bench.pool_manifest import pool_problem
    from bench.runner import load_model

    model = load_model(cfg)
    data_root = cfg.paths.get("data_root")
    if cfg.experts.source != "train":
        log.info("experts %s are given as adapters; nothing to train", cfg.experts.name)
        return
    if cfg.experts.get("domain", "nlp") == "vl":
        load_pool(cfg.experts, model, data_root)  # trains what is missing
        return
    problem = "force=true" if cfg.force else pool_problem(cfg.experts, model, data_root)
    if problem is None:
        log.info("expert pool %s is complete at %s; nothing to do", cfg.experts.name, cfg.experts.dir)
        return
    log.info("training expert pool %s (%s)", cfg.experts.name, problem)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest = train_pool(cfg.experts, model, data_root, force=bool(cfg.force))
    for row in manifest["experts"]:
        status = "trained" if row.get("created", "") >= started else "kept"
        log.info("  %-22s base %.3f -> expert %.3f (n=%d, %.0fs, %s)", row["name"], row["base_score"],
                 row["expert_score"], row["n_eval"], row["seconds"], status)


if __name__ == "__main__":
    main()
