"""Expert pools: load a configured list of adapters, or train one LoRA per subtask with peft and cache it.

A trained pool lives in ``experts.dir`` as one peft folder per expert plus ``manifest.json`` (command, seed,
data hash, base-model fingerprint, each expert's score vs the base on its own task). A pool is complete
when the manifest matches the config and the base model; `make experts` then does nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from bench.adapters import LoraAdapter
from bench.config import default_data_root, load_group_option
from bench.errors import AdapterError, ConfigError
from bench.lm import LanguageModel
from bench.models import fingerprint
from bench.pool import ExpertPool
from bench.records import write_json_atomic
from methods.base import Composed, FitReport
from tasks.base import Example, Task

MANIFEST = "manifest.json"
SOURCES = ("train", "adapters")


def load_pool(cfg: DictConfig, model, data_root: str | None, train_if_missing: bool = True) -> ExpertPool:
    """The pool an experts config describes, trained first when it is missing or stale (and allowed)."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"experts.source={cfg.source!r}; choose one of {SOURCES}")
    if cfg.source == "adapters":
        if not cfg.adapters:
            raise ConfigError("experts.source=adapters needs experts.adapters: a list of peft folders or hub ids")
        pool = ExpertPool.from_sources(model.model_id, list(cfg.adapters), cache_dir=cfg.get("hub_cache"))
    else:
        if cfg.get("domain", "nlp") == "vl":
            from bench.experts_vl import load_subject_pool

            return load_subject_pool(cfg, model, data_root, train_if_missing)
        folder = Path(cfg.dir)
        problem = pool_problem(cfg, model)
        if problem:
            if not train_if_missing:
                raise AdapterError(f"expert pool {cfg.name!r} at {folder}: {problem}; run `make experts`")
            train_pool(cfg, model, data_root)
        names = expert_names(cfg)
        pool = ExpertPool(model.model_id, [LoraAdapter.from_peft_folder(folder / n, name=n) for n in names])
    pool.check_model(model.base_model)
    return pool


def expert_names(cfg: DictConfig) -> list[str]:
    return [str(s) for s in cfg.train.subtasks]


def manifest_problem(cfg: DictConfig, base: torch.nn.Module) -> str | None:
    """Why the manifest in ``cfg.dir`` does not vouch for a pool of `base` trained with ``cfg.train`` (None: it does).
    Shared by LM and diffusion pools; each then checks its own expert files."""
    path = Path(cfg.dir) / MANIFEST
    if not path.is_file():
        return "not trained yet (no manifest.json)"
    manifest = json.loads(path.read_text())
    if manifest.get("base_fingerprint") != fingerprint(base):
        return "trained on other base-model weights (fingerprint differs)"
    if manifest.get("train") != OmegaConf.to_container(cfg.train, resolve=True):
        return "trained with another training config"
    return None


def pool_problem(cfg: DictConfig, lm: LanguageModel) -> str | None:
    """Why a trained pool's cache cannot be used (None when it is complete and current)."""
    problem = manifest_problem(cfg, lm.base_model)
    if problem:
        return problem
    missing = [n for n in expert_names(cfg) if not (Path(cfg.dir) / n / "adapter_config.json").is_file()]
    return f"experts missing: {missing}" if missing else None


def make_task(name: str, overrides: DictConfig | dict | None, data_root: str | None) -> Task:
    from bench.registry import get_task

    cfg = OmegaConf.merge(load_group_option("task", name), overrides or {})
    return get_task(name)(cfg, data_root)


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


def train_pool(cfg: DictConfig, lm: LanguageModel, data_root: str | None) -> dict:
    """Train one LoRA per subtask of `cfg.train.task` on `lm` and write the pool and its manifest."""
    train = cfg.train
    folder = Path(cfg.dir)
    folder.mkdir(parents=True, exist_ok=True)
    task = make_task(train.task, train.get("task_cfg"), data_root)
    base_fp = fingerprint(lm.base_model)
    rows, digest = [], hashlib.sha256()
    for subtask in tqdm(expert_names(cfg), desc=f"experts {cfg.name}"):
        examples = task.train_examples(subtask, int(train.examples), int(train.seed))
        for e in examples:
            digest.update(f"{e.input}\x00{e.train_target}\x01".encode())
        start = time.perf_counter()
        adapter = train_expert(lm, task, examples, train, name=subtask)
        seconds = time.perf_counter() - start
        adapter.metadata = {"task": train.task, "subtask": subtask,
                            "task_cfg": OmegaConf.to_container(OmegaConf.create(train.get("task_cfg") or {}), resolve=True),
                            "pool": cfg.name, "train_seconds": round(seconds, 1)}
        adapter.save(folder / subtask)
        row = {"name": subtask, "task": train.task, "train_examples": len(examples), "steps": int(train.steps),
               "seconds": round(seconds, 1)}
        row.update(manifest_scores(lm, task, adapter, int(cfg.get("manifest_eval_limit", 20))))
        rows.append(row)
    manifest = {
        "pool": cfg.name, "base_model": lm.model_id, "base_fingerprint": base_fp,
        "command": " ".join(sys.argv), "train": OmegaConf.to_container(train, resolve=True),
        "data_sha256": digest.hexdigest(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "experts": rows,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


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
    """The base model's and the expert's exact match on the first `limit` eval examples of its subtask."""
    subtask = adapter.metadata["subtask"]
    examples = task.eval_examples(subtask, limit)
    base_score, _ = task.score_examples(Composed(lm, FitReport(), "base"), examples)
    with lm.adapter_applied(adapter):
        expert_score, _ = task.score_examples(Composed(lm, FitReport(), adapter.name), examples)
    return {"n_eval": len(examples), "base_score": base_score, "expert_score": expert_score}
