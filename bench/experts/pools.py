"""Expert pools: load a configured list of adapters, or train one LoRA per subtask with peft and cache it
(which experts a trained pool must (re)train, and its manifest: `bench.experts.manifest`)."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bench.config import default_data_root
from bench.errors import AdapterError, ConfigError
from bench.files import exclusive
from bench.lora.adapters import LoraAdapter
from bench.lora.pool import ExpertPool
from bench.models.lm import LanguageModel
from bench.models.loading import fingerprint
from bench.registry import make_task
from bench.experts.manifest import (
    MANIFEST, expert_names, expert_problem, plan_pool, pool_problem, read_manifest, train_if_stale, write_manifest,
)
from methods.base import Composed, FitReport
from tasks.base import Example, Task
from tasks.metrics import paired_sign_p

SOURCES = ("train", "adapters", "pools")

log = logging.getLogger(__name__)


def member_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """The pools a ``source: pools`` config joins (``members``: key -> experts config; their experts are named
    ``<key>.<name>`` in the joined pool); {} for any other source."""
    if cfg.get("source") != "pools":
        return {}
    members = cfg.get("members") or {}
    if not members:
        raise ConfigError(f"experts {cfg.name!r}: source=pools needs members (key -> an experts config)")
    for key, member in members.items():
        if member.get("source") not in ("train", "adapters"):
            raise ConfigError(f"experts.members.{key}: source={member.get('source')!r}; a member is a trained pool "
                              "or a list of adapters")
        if member.get("domain", "nlp") != "nlp":
            raise ConfigError(f"experts.members.{key}: joined pools are language-model pools, not {member.domain!r}")
    return {str(k): v for k, v in members.items()}


def load_pool(cfg: DictConfig, model, data_root: str | None, train_if_missing: bool = True) -> ExpertPool:
    """The pool an experts config describes, trained first when it is missing or stale (and allowed)."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"experts.source={cfg.source!r}; choose one of {SOURCES}")
    if cfg.source == "pools":
        adapters = []
        for key, member in member_configs(cfg).items():
            for adapter in load_pool(member, model, data_root, train_if_missing):
                adapter.name = f"{key}.{adapter.name}"
                adapters.append(adapter)
        pool = ExpertPool(model.model_id, adapters)
    elif cfg.source == "adapters":
        if not cfg.adapters:
            raise ConfigError("experts.source=adapters needs experts.adapters: a list of peft folders or hub ids")
        pool = ExpertPool.from_sources(model.model_id, list(cfg.adapters), cache_dir=cfg.get("hub_cache"))
    else:
        if cfg.get("domain", "nlp") == "vl":
            from bench.experts.vl import load_subject_pool

            return load_subject_pool(cfg, model, data_root, train_if_missing)
        folder = Path(cfg.dir)
        train_if_stale(cfg, folder, lambda: pool_problem(cfg, model, data_root),
                       lambda: train_pool(cfg, model, data_root), train_if_missing)
        names = expert_names(cfg)
        pool = ExpertPool(model.model_id, [LoraAdapter.from_peft_folder(folder / n, name=n) for n in names])
    pool.check_model(model.base_model)
    return pool


def expert_task_examples(adapter: LoraAdapter, n: int, seed: int, data_root: str | None = None) -> list[Example]:
    """`n` training examples of the task an expert was trained on (from its metadata); never eval examples."""
    meta = adapter.metadata or {}
    if "task" not in meta or "subtask" not in meta:
        raise ConfigError(
            f"expert {adapter.name!r} has no task metadata (bench_metadata.json with task/subtask); "
            "methods that need the experts' own tasks (moa, retriever) work on pools trained by `make experts`"
        )
    task = make_task(meta["task"], meta.get("task_cfg"), data_root or default_data_root())
    return task.train_examples(meta["subtask"], n, seed)


def train_pool(cfg: DictConfig, lm: LanguageModel, data_root: str | None, force: bool = False,
               only: set[str] | None = None) -> dict:
    """Train the stale or missing experts of the pool (every expert with `force`; of those, only the names in
    `only` when given: one shard of a pool trained by several processes) on `lm`, keeping the current ones
    (adapter folders and manifest rows untouched), and write the manifest after each expert (`_merge_manifest`:
    other processes' rows are kept)."""
    folder = Path(cfg.dir)
    folder.mkdir(parents=True, exist_ok=True)
    data_root = data_root if data_root is not None else default_data_root()
    task, plans = plan_pool(cfg, data_root, lm.tokenizer.eos_token)
    base_fp = fingerprint(lm.base_model)
    manifest = read_manifest(cfg, data_root) or {}
    same_base = manifest.get("base_fingerprint") == base_fp
    old_rows = {r["name"]: r for r in manifest.get("experts") or []} if same_base else {}
    problems = {p.name: "force" if force else expert_problem(p, old_rows.get(p.name), folder) for p in plans}
    todo = [p for p in plans if problems[p.name] and (only is None or p.name in only)]
    if not todo:
        return manifest
    log.info("pool %s: training %s", cfg.name, [p.name for p in todo])
    pending = {p.name for p in todo}
    result = _merge_manifest(cfg, lm, base_fp, plans, {}, pending, data_root)  # stale rows dropped before their adapters change
    task_cfg = OmegaConf.to_container(OmegaConf.create(cfg.train.get("task_cfg") or {}), resolve=True)
    for plan in tqdm(todo, desc=f"experts {cfg.name}"):
        start = time.perf_counter()
        adapter = train_expert(lm, task, plan.examples, plan.train, name=plan.name)
        seconds = time.perf_counter() - start
        adapter.metadata = {"task": plan.train.task, "subtask": plan.name, "task_cfg": task_cfg,
                            "pool": cfg.name, "train_seconds": round(seconds, 1)}
        adapter.save(folder / plan.name)
        row = {"name": plan.name, "task": plan.train.task, "train_examples": len(plan.examples),
               "steps": int(plan.train.steps), "seconds": round(seconds, 1)}
        row.update(manifest_scores(lm, task, adapter, int(cfg.get("manifest_eval_limit", 20))))
        row.update(plan.record(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        pending.discard(plan.name)
        result = _merge_manifest(cfg, lm, base_fp, plans, {plan.name: row}, pending, data_root)
    return result


def _merge_manifest(cfg: DictConfig, lm: LanguageModel, base_fp: str, plans: list, rows: dict,
                    dropped: set[str], data_root: str) -> dict:
    """Under the manifest's lock: the rows on disk (of this base model; backfilled, `read_manifest`) updated with
    `rows`, without the experts in `dropped` (being retrained), written atomically, so processes training shards
    of one pool each add their own experts' rows."""
    with exclusive(Path(cfg.dir) / MANIFEST, f"writing the manifest of pool {cfg.name}"):
        on_disk = read_manifest(cfg, data_root) or {}
        merged = {r["name"]: r for r in on_disk.get("experts") or []} if on_disk.get("base_fingerprint") == base_fp else {}
        merged.update(rows)
        for name in dropped:
            merged.pop(name, None)
        return write_manifest(cfg, lm, base_fp, plans, merged)


def train_expert(lm: LanguageModel, task: Task, examples: list[Example], train: DictConfig, name: str) -> LoraAdapter:
    """A peft LoRA trained on `examples` (target tokens only), returned as a `LoraAdapter`."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(int(train.seed))
    config = LoraConfig(r=int(train.rank), lora_alpha=float(train.alpha), target_modules=list(train.targets),
                        lora_dropout=0.0, task_type="SEQ_2_SEQ_LM" if lm.is_seq2seq else "CAUSAL_LM")
    base = lm.model
    peft_model = get_peft_model(base, config)
    lm.model, lm._base = peft_model, base
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=float(train.lr), weight_decay=0.0)
        rng = random.Random(int(train.seed))
        bar = tqdm(range(int(train.steps)), desc=f"train {name}", leave=False)
        for _ in bar:
            batch = rng.sample(examples, min(int(train.batch_size), len(examples)))
            loss = lm.loss([task.prompt(e) for e in batch], [e.train_target for e in batch],
                           batch_size=len(batch), max_len=int(train.max_len))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    finally:
        lm.model = peft_model.unload()
        lm._base = None
    peft_cfg = {"r": config.r, "lora_alpha": config.lora_alpha, "base_model_name_or_path": lm.model_id,
                "task_type": config.task_type, "peft_type": "LORA"}
    return LoraAdapter.from_peft_state(state, peft_cfg, name)


def manifest_scores(lm: LanguageModel, task: Task, adapter: LoraAdapter, limit: int) -> dict:
    """The base model's and the expert's exact match on the first `limit` eval examples of its subtask, with the
    paired comparison: `wins` (expert right, base wrong), `losses` (the reverse) and `p_beats_base`, the one-sided
    exact McNemar p-value of the expert being no better than the base (`tasks.metrics.paired_sign_p`)."""
    subtask = adapter.metadata["subtask"]
    examples = task.eval_examples(subtask, limit)
    base_score, base_rows = task.score_examples(Composed(lm, FitReport(), "base"), examples)
    with lm.adapter_applied(adapter):
        expert_score, expert_rows = task.score_examples(Composed(lm, FitReport(), adapter.name), examples)
    wins = sum(bool(e["correct"]) and not b["correct"] for e, b in zip(expert_rows, base_rows))
    losses = sum(bool(b["correct"]) and not e["correct"] for e, b in zip(expert_rows, base_rows))
    return {"n_eval": len(examples), "base_score": base_score, "expert_score": expert_score,
            "wins": wins, "losses": losses, "p_beats_base": paired_sign_p(wins, losses)}


def rescore_pool(cfg: DictConfig, lm: LanguageModel, data_root: str | None) -> dict:
    """Score every expert of a complete, current pool again (``manifest_eval_limit`` examples each) and rewrite
    its manifest rows' scores atomically after each expert; adapters and training records stay as they are."""
    data_root = data_root if data_root is not None else default_data_root()
    problem = pool_problem(cfg, lm, data_root)
    if problem:
        raise AdapterError(f"expert pool {cfg.name!r}: {problem}; train it (`make experts`) before re-scoring")
    folder = Path(cfg.dir)
    task, plans = plan_pool(cfg, data_root, lm.tokenizer.eos_token)
    manifest = read_manifest(cfg, data_root)
    rows = {r["name"]: r for r in manifest["experts"]}
    for plan in tqdm(plans, desc=f"rescore {cfg.name}"):
        adapter = LoraAdapter.from_peft_folder(folder / plan.name, name=plan.name)
        rows[plan.name].update(manifest_scores(lm, task, adapter, int(cfg.get("manifest_eval_limit", 20))))
        manifest = write_manifest(cfg, lm, manifest["base_fingerprint"], plans, rows, command=manifest["command"],
                                  rescored_by=" ".join(sys.argv))
    return manifest
