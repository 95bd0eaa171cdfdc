"""`python -m bench.train_experts profile=P [experts=..]` (`make experts PROFILE=P`): train the profile's expert
pool unless its cache is complete and current (`force=true` retrains)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from bench.config import CONF_DIR, register_resolvers

log = logging.getLogger("bench")
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.experts import load_pool, pool_problem, train_pool
    from bench.runner import load_model

    model = load_model(cfg)
    data_root = cfg.paths.get("data_root")
    if cfg.experts.source != "train":
        log.info("experts %s are given as adapters; nothing to train", cfg.experts.name)
        return
    if cfg.experts.get("domain", "nlp") == "vl":
        load_pool(cfg.experts, model, data_root)  # trains what is missing
        return
    problem = "force=true" if cfg.force else pool_problem(cfg.experts, model)
    if problem is None:
        log.info("expert pool %s is complete at %s; nothing to do", cfg.experts.name, cfg.experts.dir)
        return
    log.info("training expert pool %s (%s)", cfg.experts.name, problem)
    manifest = train_pool(cfg.experts, model, data_root)
    for row in manifest["experts"]:
        log.info("  %-22s base %.3f -> expert %.3f (n=%d, %.0fs)", row["name"], row["base_score"],
                 row["expert_score"], row["n_eval"], row["seconds"])


if __name__ == "__main__":
    main()
