"""`method=moa`: Mixture-of-LoRAs routing (Feng et al., 2024; DESIGN §4).

A light router reads the frozen base model's last hidden states, mean-pooled over the input's tokens
(the encoder's for seq2seq models), and classifies the input into one of the experts' tasks; it is trained
on the experts' own task examples with the expert index as the label (cross-entropy, AdamW, full batch).
At inference each input is routed on its own: the top-1 expert (or the top-k, weighted by the renormalized
softmax of the router's logits) is applied to that batch row through per-row gates (batch, N) of the
stacked expert layer, so a mixed-task batch is served in one `generate` call. Routing accuracy on held-out
expert examples is recorded in `FitReport.info`; the experts chosen at inference are kept on the composed
model (`routes`) and counted in ``report.info["route_counts"]``.

Where labeled examples come from: `expert_examples(adapter, n, seed)` calls the harness's
``bench.experts.pools.expert_task_examples(adapter, n, seed)`` (training examples of the task each expert was
trained on, from the adapter's metadata, never eval examples); the router reads them through that task's
prompt (`task_prompt`) and `format_prompt`, as `generate` reads an eval prompt.

`RoutedComposed` (per-row routing wrapper) is shared with the retrieval router (methods/retriever.py).
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from torch import nn
from torch.nn import functional as F

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear, set_gates, stacked_experts
from bench.models.batching import pad_rows
from bench.models.generation import RowHooks
from bench.models.lm import LanguageModel
from bench.progress import BARS_OFF
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from tasks.base import Example


# --------------------------------------------------------------------------- labeled examples


def expert_examples(adapter, n: int, seed: int) -> list[Example]:
    """`n` examples of the task `adapter` was trained on, drawn with `seed` (through the harness)."""
    try:
        experts = importlib.import_module("bench.experts.pools")
    except ImportError:
        experts = None
    provider = getattr(experts, "expert_task_examples", None)
    if provider is None:
        raise ConfigError(
            f"routing needs examples of each expert's own task, but bench.experts.pools.expert_task_examples is not "
            f"available (expert {adapter.name!r}, metadata {adapter.metadata or {}}); use a pool trained by the "
            "harness (its adapters carry their task in metadata)"
        )
    return list(provider(adapter, n, seed))


def task_prompt(adapter) -> Callable[[Example], str]:
    """The prompt function of the task `adapter` was trained on (what the expert read in training), from its
    metadata through ``bench.registry.make_task``. A task that cannot be built is an error, not a silent fall back
    to the raw input: the router would then learn from prompts the experts never read."""
    from bench.config import default_data_root
    from bench.registry import make_task

    meta = adapter.metadata or {}
    if "task" not in meta:
        raise ConfigError(f"expert {adapter.name!r} has no task in its metadata {meta}: its prompt format is unknown")
    return make_task(meta["task"], meta.get("task_cfg"), default_data_root()).prompt


def expert_prompts(adapter, n: int, seed: int) -> list[str]:
    """`n` prompts of the expert's own task, as the model reads them (task prompt applied)."""
    examples = expert_examples(adapter, n, seed)
    prompt = task_prompt(adapter)
    return [prompt(e) for e in examples]


def labeled_examples(pool: ExpertPool, n_per_expert: int, seed: int,
                     provider: Callable | None = None) -> tuple[list[str], list[int]]:
    """(prompts, labels): `n_per_expert` prompts of each expert's task, labeled with the expert's index.

    `provider(adapter, n, seed) -> list[str]` defaults to `expert_prompts`.
    """
    provider = provider or expert_prompts
    texts, labels = [], []
    for i, adapter in enumerate(pool):
        prompts = list(provider(adapter, n_per_expert, seed))
        if not prompts:
            raise ConfigError(f"expert {adapter.name!r}: the example provider returned no examples")
        texts.extend(prompts)
        labels.extend([i] * len(prompts))
    return texts, labels


# --------------------------------------------------------------------------- features and router


@torch.no_grad()
def hidden_features(lm: LanguageModel, prompts: Sequence[str], max_rows: int | None = None,
                    token_budget: int | None = None) -> torch.Tensor:
    """Mean-pooled last hidden states of `lm.model` (the encoder's for seq2seq), (len(prompts), d), float32, in
    input order.

    Prompts are formatted and padded as `LanguageModel.generate` does (left padding for causal LMs), in
    length-sorted batches of at most `token_budget` padded tokens (default: the generation budget) and `max_rows`.
    """
    from bench.models.batching import default_token_budget, plan_batches

    side = "right" if lm.is_seq2seq else "left"
    rows = [lm.prompt_ids(p) for p in prompts]
    budget = token_budget or lm.token_budget or default_token_budget(lm.model)
    feats: torch.Tensor | None = None
    for batch in tqdm(plan_batches([len(r) for r in rows], 0, budget, max_rows), desc="fit moa: features",
                      leave=False, disable=len(prompts) < 256 or BARS_OFF):
        ids = [rows[i] for i in batch.index]
        input_ids = pad_rows(ids, lm.tokenizer.pad_token_id, side=side).to(lm.device)
        mask = pad_rows([[1] * len(r) for r in ids], 0, side=side).to(lm.device)
        if lm.is_seq2seq:
            hidden = lm.model.get_encoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        else:  # the backbone without the LM head, which keeps no other layer's states (they cost 30x the memory)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hidden = lm.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=pos).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()
        if feats is None:
            feats = pooled.new_empty(len(prompts), pooled.shape[1])
        feats[batch.index] = pooled
    return feats


class Router(nn.Module):
    """Standardized features -> (MLP | linear) -> N logits."""

    def __init__(self, d: int, n_experts: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_experts))
        else:
            self.net = nn.Linear(d, n_experts)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats.float() - self.mean) / self.std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def train_router(features: torch.Tensor, labels: Sequence[int], n_experts: int, *, hidden: int = 0,
                 dropout: float = 0.0, epochs: int = 300, lr: float = 1e-2, weight_decay: float = 1e-2,
                 seed: int = 0) -> Router:
    """Fit a `Router` on (features, labels) with full-batch AdamW and cross-entropy (seeded, deterministic)."""
    y = torch.as_tensor(list(labels), dtype=torch.long, device=features.device)
    x = features.float()
    with torch.random.fork_rng(devices=[features.device] if features.device.type == "cuda" else []):
        torch.manual_seed(seed)
        router = Router(x.shape[1], n_experts, hidden, dropout).to(x.device)
        router.mean.copy_(x.mean(0))
        router.std.copy_(x.std(0, unbiased=False).clamp(min=1e-6))
        # foreach=False on CPU: the multi-tensor path is ~8x slower there for a few tiny tensors
        opt = torch.optim.AdamW(router.net.parameters(), lr=lr, weight_decay=weight_decay,
                                foreach=x.device.type == "cuda")
        router.train()
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(router(x), y).backward()
                opt.step()
    router.eval()
    router.requires_grad_(False)
    return router


def holdout_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified (train, held-out) indices: about `fraction` of each label's examples held out (≥1 kept)."""
    rng = random.Random(seed)
    train, held = [], []
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(int(y), []).append(i)
    for idx in by_label.values():
        idx = idx[:]
        rng.shuffle(idx)
        k = min(len(idx) - 1, round(fraction * len(idx))) if fraction > 0 else 0
        held.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(held)


def route_gates(logits: torch.Tensor, top_k: int = 1) -> torch.Tensor:
    """(batch, N) gates: one-hot on the argmax (top_k=1) or the softmax renormalized over the top-k."""
    k = min(top_k, logits.shape[-1])
    values, idx = logits.float().topk(k, dim=-1)
    weights = torch.softmax(values, dim=-1)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(-1, idx, weights)


# --------------------------------------------------------------------------- per-row routed model


@dataclass
class RoutedComposed(Composed):
    """The base with the experts in place; before each generated chunk, `route(prompts)` returns (b, N)
    composition weights and (b, N) scores (router logits or similarities, which order the chosen experts in
    `routes`), and `apply(weights)` sets the weights per row (stacked-layer gates, or per-row fused factors)."""

    route: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    apply: Callable[[torch.Tensor | None], None] | None = None
    names: list[str] = field(default_factory=list)
    routes: list[list[str]] = field(default_factory=list)  # experts used for each prompt generated so far
    state: dict | None = None  # what `save` writes (router weights, expert names, ...)

    def save(self, folder) -> Path | None:
        """Write `state` (tensors and JSON-able values) as ``routing.pt`` in `folder`; None when there is none."""
        if self.state is None:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "routing.pt.tmp"
        torch.save(self.state, tmp)
        tmp.replace(folder / "routing.pt")
        return folder

    def generate(self, prompts: list[str], **kwargs) -> list[str]:
        hooks = RouteHooks(self)
        outputs = self.model.generate(prompts, hooks=hooks, **kwargs)  # fresh hooks per call: they keep its routes
        counts = self.report.info.setdefault("route_counts", {})
        for i in range(len(prompts)):  # routes in input order
            chosen = hooks.chosen[i]
            self.routes.append(chosen)
            counts[chosen[0]] = counts.get(chosen[0], 0) + 1
        return outputs


class RouteHooks(RowHooks):
    """Engine hooks of a routed model: each batch's prompts are routed when it starts (per-row weights applied),
    the weights follow their rows through compaction, and the experts chosen for each input are kept."""

    def __init__(self, composed: RoutedComposed) -> None:
        self.composed = composed
        self.weights: torch.Tensor | None = None
        self.chosen: dict[int, list[str]] = {}

    def start(self, index: list[int], prompts: list[str]) -> None:
        weights, scores = self.composed.route(prompts)
        self.weights = weights
        self.composed.apply(weights)
        names = self.composed.names
        for i, row, score in zip(index, weights.tolist(), scores.tolist()):
            order = sorted(range(len(row)), key=lambda j: (-row[j], -score[j]))
            self.chosen[i] = [names[j] for j in order if row[j] > 0]

    def select(self, keep: torch.Tensor) -> None:
        self.weights = self.weights[keep.to(self.weights.device)]
        self.composed.apply(self.weights)

    def end(self) -> None:
        self.weights = None
        self.composed.apply(None)


def gate_applier(layers: dict[str, StackedLoraLinear], n: int, device) -> Callable:
    """`apply(weights)`: per-row gates on the stacked layers; None: no expert (the base)."""

    def apply(weights: torch.Tensor | None) -> None:
        set_gates(layers, torch.zeros(n, device=device) if weights is None else weights.to(device))

    return apply


# --------------------------------------------------------------------------- the method


@register_method("moa")
class MixtureOfLoras(Method):
    def check_config(self) -> None:
        cfg = self.cfg
        if int(cfg.get("top_k", 1)) < 1:
            raise ConfigError(f"method.top_k={cfg.top_k}: must be ≥ 1")
        if int(cfg.get("examples_per_expert", 64)) < 2:
            raise ConfigError("method.examples_per_expert must be ≥ 2 (some are held out to measure routing accuracy)")
        if not 0 <= float(cfg.get("holdout", 0.25)) < 1:
            raise ConfigError(f"method.holdout={cfg.holdout}: a fraction in [0, 1)")
        if int(cfg.get("hidden", 0)) < 0 or int(cfg.get("epochs", 300)) < 1:
            raise ConfigError("method.hidden must be ≥ 0 and method.epochs ≥ 1")

    _cache: dict | None = None
    _features: dict | None = None

    def fit_router(self, lm: LanguageModel, pool: ExpertPool, seed: int,
                   provider: Callable | None = None) -> tuple[Router, dict]:
        """Train the router on the experts' own task examples; returns it and what it used."""
        cfg = self.cfg
        texts, labels = labeled_examples(pool, int(cfg.get("examples_per_expert", 64)), seed, provider)
        feats = self.expert_features(lm, pool, texts, labels, seed, provider)
        train, held = holdout_split(labels, float(cfg.get("holdout", 0.25)), seed)
        router = train_router(
            feats[train], [labels[i] for i in train], len(pool), hidden=int(cfg.get("hidden", 0)),
            dropout=float(cfg.get("dropout", 0.0)), epochs=int(cfg.get("epochs", 300)), lr=float(cfg.get("lr", 1e-2)),
            weight_decay=float(cfg.get("weight_decay", 1e-2)), seed=seed,
        )
        y = torch.tensor(labels, device=feats.device)
        with torch.no_grad():
            pred = router(feats).argmax(-1)
        acc = lambda idx: float((pred[idx] == y[idx]).float().mean()) if idx else None  # noqa: E731
        info = {"routing_accuracy": acc(held), "router_train_accuracy": acc(train),
                "router_examples": len(train), "heldout_examples": len(held),
                "router_params": router.num_parameters(), "epochs": int(cfg.get("epochs", 300))}
        return router, info

    def expert_features(self, lm: LanguageModel, pool: ExpertPool, texts: list[str], labels: list[int],
                        seed: int, provider: Callable | None = None) -> torch.Tensor:
        """Features of the labeled prompts, (len(texts), d). An expert's are computed once per model and seed
        and reused by every later router whose pool holds it (the cross-task protocol fits one per fold, each
        from another draw of the same experts); the experts not seen yet are computed together."""
        self._features = self._features or {}
        rows = {i: [j for j, label in enumerate(labels) if label == i] for i in range(len(pool))}
        keys = [(id(lm), adapter.name, seed, len(rows[i]), provider) for i, adapter in enumerate(pool)]
        missing = [i for i, key in enumerate(keys) if key not in self._features]
        if missing:
            index = [j for i in missing for j in rows[i]]
            new = hidden_features(lm, [texts[j] for j in index], int(self.cfg.get("feature_batch_size", 128)))
            start = 0
            for i in missing:
                self._features[keys[i]] = new[start:start + len(rows[i])]
                start += len(rows[i])
        feats = torch.empty(len(texts), self._features[keys[0]].shape[1], device=self._features[keys[0]].device)
        for i, key in enumerate(keys):
            feats[rows[i]] = self._features[key]
        return feats

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        n = self.cfg.get("n")
        pool = ctx.pool.sample(None if n is None else int(n), ctx.seed)
        lm = ctx.model
        # one router per (experts, seed): later fit units (per-subtask scope) reuse it at no cost
        key = (tuple(pool.names), int(ctx.seed), id(lm))
        self._cache = self._cache or {}
        with Timer() as timer:
            cached = key in self._cache
            if not cached:
                self._cache[key] = self.fit_router(lm, pool, ctx.seed)
            router, info = self._cache[key]
        if cached:
            info = {**info, "router_reused": True}
        top_k = int(self.cfg.get("top_k", 1))
        report = FitReport(examples=0 if cached else info["router_examples"], steps=0 if cached else info["epochs"],
                           seconds=timer.seconds, trained_params=info["router_params"],
                           info={**info, "top_k": top_k, "experts": pool.names, "route_counts": {}})
        with stacked_experts(lm.model, pool) as layers:
            apply = gate_applier(layers, len(pool), lm.device)
            apply(None)
            fb = int(self.cfg.get("feature_batch_size", 128))

            def route(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
                apply(None)  # features of the frozen base: no expert active
                with torch.no_grad():
                    logits = router(hidden_features(lm, prompts, fb))
                return route_gates(logits, top_k), logits

            state = {"router": router.state_dict(), "experts": pool.names, "top_k": top_k,
                     "hidden": int(self.cfg.get("hidden", 0)), "features": "mean-pooled last hidden state"}
            yield RoutedComposed(lm, report, "" if top_k == 1 else f"top{top_k}", None, route=route, apply=apply,
                                 names=pool.names, state=state)
