"""`method=lorahub`: LoraHub (Huang et al., 2023), gradient-free search of one weight per LoRA (DESIGN §4).

One scalar ``w_i`` per expert, shared by all layers, ``w ∈ [-bound, bound]^N`` (bound 1.5), init 0, found by
nevergrad ``NGOpt`` with a budget of 40 objective evaluations. Objective (minimized):

    cross-entropy of the fit examples' targets  +  l1 · mean_i |w_i|

The official code (sail-sg/lorahub, ``lorahub/algorithm.py``: ``default_l1_regularization``) uses
``0.05 · sum|w| / len(w)``, i.e. the *mean* of |w|; so do we. Its loss (``default_get_loss``) sums each
batch's token-mean cross-entropy and divides by the number of examples K (with its default of one batch, the
token mean / K), so the L1 term weighs K× more against the loss than against a plain mean cross-entropy.
`loss_reduction` chooses ``official`` (default: that objective, Σ_batches token-mean / K, over batches of
``batch_size`` examples in input order; ``batch_size: null``, the default, is the official one batch of all K)
or ``mean`` (labelled non-official: the mean over examples of each example's mean target-token cross-entropy,
the same number as ``LanguageModel.loss``; K× the official loss, so the L1 term weighs K× less). The forward
passes are length-sorted token-budget batches (`bench.models.batching`) whatever ``batch_size`` is: each example's
token sums are gathered back in input order before the objective's batches are formed.

Composition semantics (`semantics`):

- ``official``: ``A' = Σ w_i A_i``, ``B' = Σ w_i B_i`` with the experts' common LoRA scale, as the official
  code does on peft state dicts (cross terms ``w_i w_j B_i A_j`` included). Needs, per module, the same rank
  and scale in every expert; otherwise a clear `AdapterError` (use ``exact``).
- ``exact``: ``ΔW = Σ w_i s_i B_i A_i`` (any ranks and scales), evaluated through the stacked expert layer
  with gates = w and returned as one concatenated LoRA (`concat_merge`).

Candidates are evaluated by rewriting small tensors in place, never by rebuilding the model: for
``official``, every targeted linear layer is wrapped once in a `FactorLoraLinear` whose factors are views
into one flat buffer, so a candidate costs two GEMMs (``w @ A_flat`` and ``w @ B_flat`` for all modules at
once); for ``exact`` a candidate is a gate vector. With ``population > 1`` several candidates (nevergrad
``num_workers``) are evaluated in one batched forward: row group p of the batch uses candidate p.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn
from torch.nn import functional as F

from bench.errors import AdapterError, ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.lora.stacked import WrappedLinear, stacked_experts
from bench.models.lm import target_token_losses
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.linear import concat_merge

SEMANTICS = ("official", "exact")
LOSS_REDUCTIONS = ("mean", "official")


# --------------------------------------------------------------------------- in-place factor layers


def common_factors(pool: ExpertPool) -> dict[str, tuple[int, float]]:
    """Module path -> (rank, scale) shared by every expert; `AdapterError` naming the module otherwise."""
    out = {}
    ref = pool[0]
    for module in pool.module_names:
        r, s = ref.modules[module].rank, ref.modules[module].scale
        for adapter in pool:
            m = adapter.modules[module]
            if m.rank != r or not math.isclose(m.scale, s, rel_tol=1e-6):
                raise AdapterError(
                    f"LoraHub's official composition (A' = Σ w_i A_i, B' = Σ w_i B_i) needs one rank and scale "
                    f"per module across the experts, but at {module} expert {adapter.name!r} has rank {m.rank}, "
                    f"scale {m.scale:g} and {ref.name!r} has rank {r}, scale {s:g}; use semantics=exact"
                )
        out[module] = (r, s)
    return out


class FactorBank:
    """All experts' A and B of every module as two flat matrices, and the composed factors as views.

    ``A_src`` is (N, Σ_m r_m·d_in_m): row i is expert i's A of every module, flattened and concatenated;
    likewise ``B_src``. `set_weights(W)` with W (G, N) writes ``W @ A_src`` and ``W @ B_src`` into the output
    buffers in place (two GEMMs for the whole model), so G composed LoRAs (one per row group of the batch)
    are ready. Module j's composed factors are views (G, r, d_in) and (G, d_out, r) of those buffers.
    """

    def __init__(self, pool: ExpertPool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_groups: int = 1) -> None:
        self.names = pool.module_names
        self.n_experts = len(pool)
        self.scales = {}
        self.shapes = {}  # module -> (r, d_in, d_out)
        self._offsets = {}  # module -> (a0, a1, b0, b1)
        specs = common_factors(pool)
        a_off = b_off = 0
        for module in self.names:
            r, s = specs[module]
            m = pool[0].modules[module]
            self.scales[module] = s
            self.shapes[module] = (r, m.d_in, m.d_out)
            self._offsets[module] = (a_off, a_off + r * m.d_in, b_off, b_off + m.d_out * r)
            a_off += r * m.d_in
            b_off += m.d_out * r
        self.A_src = torch.empty(self.n_experts, a_off, device=device, dtype=dtype)
        self.B_src = torch.empty(self.n_experts, b_off, device=device, dtype=dtype)
        for i, adapter in enumerate(pool):
            for module in self.names:
                a0, a1, b0, b1 = self._offsets[module]
                m = adapter.modules[module]
                self.A_src[i, a0:a1] = m.A.reshape(-1).to(device, dtype)
                self.B_src[i, b0:b1] = m.B.reshape(-1).to(device, dtype)
        self.A_out = torch.zeros(max(1, max_groups), a_off, device=device, dtype=dtype)
        self.B_out = torch.zeros(max(1, max_groups), b_off, device=device, dtype=dtype)
        self.groups = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.A_src.dtype

    @torch.no_grad()
    def set_weights(self, weights) -> None:
        """Compose: ``A'_g = Σ_i W[g, i] A_i``, ``B'_g = Σ_i W[g, i] B_i`` for every module, in place.

        `weights`: (N,) for one composition, or (G, N) for G row groups of the next batches.
        """
        W = torch.as_tensor(weights, dtype=self.dtype, device=self.A_src.device)
        W = W.reshape(1, -1) if W.dim() == 1 else W
        if W.shape[1] != self.n_experts:
            raise ValueError(f"{W.shape[1]} weights per composition for {self.n_experts} experts")
        G = W.shape[0]
        if G > self.A_out.shape[0]:  # grow once; layers read the buffers through the bank
            self.A_out = torch.zeros(G, self.A_out.shape[1], device=self.A_out.device, dtype=self.dtype)
            self.B_out = torch.zeros(G, self.B_out.shape[1], device=self.B_out.device, dtype=self.dtype)
        torch.matmul(W, self.A_src, out=self.A_out[:G])
        torch.matmul(W, self.B_src, out=self.B_out[:G])
        self.groups = G

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The composed (A (G, r, d_in), B (G, d_out, r)) of `module`: views, no copy."""
        r, d_in, d_out = self.shapes[module]
        a0, a1, b0, b1 = self._offsets[module]
        G = self.groups
        return self.A_out[:G, a0:a1].view(G, r, d_in), self.B_out[:G, b0:b1].view(G, d_out, r)

    def adapter(self, group: int = 0, name: str = "lorahub", base_model: str = "", task_type=None) -> LoraAdapter:
        """The composed LoRA of one row group as a `LoraAdapter` (a copy; saveable as a peft folder)."""
        modules = {}
        for module in self.names:
            A, B = self.factors(module)
            modules[module] = LoraModule(A[group].detach().clone(), B[group].detach().clone(), self.scales[module])
        return LoraAdapter(name, base_model, modules, task_type=task_type)


class FactorLoraLinear(WrappedLinear):
    """``y = W x + scale · B'_g A'_g x`` where row group g of the batch uses composed factors g of the bank.

    The batch's rows split into `bank.groups` equal consecutive groups (one group: an ordinary LoRA layer).
    """

    def __init__(self, base: nn.Linear, bank: FactorBank, module: str) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.module = module
        self.scale = bank.scales[module]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.bank.factors(self.module)
        y = self.base(x)
        xa = x.to(A.dtype)
        G = A.shape[0]
        if G == 1:
            delta = F.linear(F.linear(xa, A[0]), B[0])
        else:
            rows = x.shape[0]
            if rows % G:
                raise RuntimeError(f"{self.module}: a batch of {rows} rows cannot be split into {G} groups")
            xg = xa.reshape(G, -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(xg, A.transpose(1, 2)), B.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        return y + (self.scale * delta).to(y.dtype)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@contextlib.contextmanager
def factor_layers(model: nn.Module, pool: ExpertPool, max_groups: int = 1,
                  dtype: torch.dtype | None = None) -> Iterator[FactorBank]:
    """Wrap each targeted linear layer of `model` in a `FactorLoraLinear` sharing one `FactorBank` for the
    span of the block (initial weights 0: the base model); the original layers are put back after."""
    pool.check_model(model)
    weight = next(model.parameters())
    bank = FactorBank(pool, weight.device, dtype or weight.dtype, max_groups)
    replaced: dict[str, nn.Module] = {}
    try:
        for path in pool.module_names:
            parent, child = _parent(model, path)
            base = getattr(parent, child)
            setattr(parent, child, FactorLoraLinear(base, bank, path))
            replaced[path] = base
        yield bank
    finally:
        for path, base in replaced.items():
            parent, child = _parent(model, path)
            setattr(parent, child, base)


def compose_official(pool: ExpertPool, weights: Sequence[float], name: str = "lorahub") -> LoraAdapter:
    """``A' = Σ w_i A_i``, ``B' = Σ w_i B_i`` per module (float64 accumulation), the experts' common scale."""
    specs = common_factors(pool)
    if len(weights) != len(pool):
        raise ConfigError(f"{len(weights)} weights for {len(pool)} experts")
    modules = {}
    for module in pool.module_names:
        parts = [a.modules[module] for a in pool]
        A = sum(float(w) * m.A.double() for w, m in zip(weights, parts))
        B = sum(float(w) * m.B.double() for w, m in zip(weights, parts))
        modules[module] = LoraModule(A.to(parts[0].A.dtype), B.to(parts[0].B.dtype), specs[module][1])
    return LoraAdapter(name, pool[0].base_model, modules, task_type=pool[0].task_type)


def compose_exact(pool: ExpertPool, weights: Sequence[float], name: str = "lorahub-exact") -> LoraAdapter:
    """``ΔW = Σ w_i s_i B_i A_i`` as one concatenated LoRA of rank Σ r_i."""
    return concat_merge(list(pool), [float(w) for w in weights], name=name)


# --------------------------------------------------------------------------- the objective


class LoraHubProblem:
    """The LoraHub objective on a `LanguageModel` with candidates applied in place.

    ``with LoraHubProblem(lm, pool, inputs, targets, ...) as problem: problem.objective(W)`` where W is
    (N,) or (G, N); returns one objective value per candidate. Inputs are encoded once.
    """

    def __init__(self, lm, pool: ExpertPool, inputs: Sequence[str], targets: Sequence[str], *,
                 semantics: str = "official", l1: float = 0.05, batch_size: int | None = None, max_len: int = 512,
                 loss_reduction: str = "official", max_groups: int = 1, token_budget: int | None = None) -> None:
        if semantics not in SEMANTICS:
            raise ConfigError(f"LoraHub semantics={semantics!r}; choose one of {SEMANTICS}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"LoraHub loss_reduction={loss_reduction!r}; choose one of {LOSS_REDUCTIONS}")
        if not inputs:
            raise ConfigError("LoraHub needs at least one fit example")
        if semantics == "official":
            common_factors(pool)  # fail before any work
        self.lm, self.pool, self.semantics = lm, pool, semantics
        self.l1, self.loss_reduction, self.max_groups = float(l1), loss_reduction, max_groups
        self.n_examples = len(inputs)
        size = batch_size or len(inputs)  # the objective's batches (official: all K in one)
        self.objective_batches = [slice(i, i + size) for i in range(0, len(inputs), size)]
        # forward batches: length-sorted within a token budget shared by the candidates of one forward
        from bench.models.batching import loss_token_budget

        budget = (token_budget or loss_token_budget(lm.model)) // max(1, max_groups)
        self.forwards = [(index, lm.encode_pairs([inputs[i] for i in index], [targets[i] for i in index], max_len))
                         for index in lm.pair_batches(inputs, targets, max_len, budget)]
        self.order = torch.as_tensor([i for index, _ in self.forwards for i in index]).argsort()
        self._stack = contextlib.ExitStack()
        self.bank: FactorBank | None = None
        self.layers = None

    def __enter__(self) -> "LoraHubProblem":
        if self.semantics == "official":
            self.bank = self._stack.enter_context(factor_layers(self.lm.model, self.pool, self.max_groups))
        else:
            self.layers = self._stack.enter_context(stacked_experts(self.lm.model, self.pool))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _apply(self, W: torch.Tensor, rows_per_group: int) -> None:
        if self.bank is not None:
            self.bank.set_weights(W)
        else:
            gates = W.to(self.lm.device).repeat_interleave(rows_per_group, dim=0)
            for layer in self.layers.values():
                layer.gates = gates if W.shape[0] > 1 else W[0].to(self.lm.device)

    @torch.no_grad()
    def losses(self, weights) -> np.ndarray:
        """The cross-entropy term of each candidate, (G,)."""
        W = torch.as_tensor(np.asarray(weights, dtype=np.float64)).float()
        W = W.reshape(1, -1) if W.dim() == 1 else W
        G = W.shape[0]
        sums, counts = [], []  # each (G, k): target-token loss sums and counts of a forward's examples
        for _, batch in self.forwards:
            k = batch["input_ids"].shape[0]
            self._apply(W, k)
            rep = {key: v.repeat(G, 1) if G > 1 else v for key, v in batch.items()}
            row_sums, row_counts = target_token_losses(self.lm.model, rep, self.lm.is_seq2seq)
            sums.append(row_sums.view(G, k))
            counts.append(row_counts.view(G, k))
        order = self.order.to(sums[0].device)
        S, C = torch.cat(sums, 1)[:, order], torch.cat(counts, 1)[:, order]  # examples in input order
        if self.loss_reduction == "mean":
            loss = (S / C.clamp(min=1)).mean(1)
        else:  # official: Σ over batches of the batch's token-mean cross-entropy, divided by the number of examples
            loss = sum(S[:, b].sum(1) / C[:, b].sum(1).clamp(min=1) for b in self.objective_batches)
            loss = loss / self.n_examples
        return loss.double().cpu().numpy()

    def regularization(self, weights) -> np.ndarray:
        W = np.asarray(weights, dtype=np.float64).reshape(-1, len(self.pool))
        return self.l1 * np.abs(W).mean(1)

    def objective(self, weights) -> np.ndarray:
        return self.losses(weights) + self.regularization(weights)


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    weights: list[float]  # the recommended weights, in pool order
    objective: float  # objective at the recommended weights
    objective_at_zero: float  # objective of the base model (w = 0)
    best_seen: float  # the lowest objective among the evaluated candidates
    evaluations: int  # objective evaluations made by the optimizer (the budget)
    history: list[float] = field(default_factory=list)  # objective of each candidate, in evaluation order
    optimizer: str = "NGOpt"


def lorahub_search(lm, pool: ExpertPool, inputs: Sequence[str], targets: Sequence[str], *, semantics: str = "official",
                   budget: int = 40, bound: float = 1.5, l1: float = 0.05, seed: int = 0, population: int = 1,
                   optimizer: str = "NGOpt", batch_size: int | None = None, max_len: int = 512,
                   loss_reduction: str = "official") -> SearchResult:
    """LoraHub's gradient-free search of one weight per expert; the model is left as it was."""
    import warnings

    import nevergrad as ng  # lazy: heavy

    if budget < 1:
        raise ConfigError(f"LoraHub budget={budget}: must be ≥ 1")
    if population < 1:
        raise ConfigError(f"LoraHub population={population}: must be ≥ 1")
    n = len(pool)
    param = ng.p.Array(init=np.zeros(n), lower=-float(bound), upper=float(bound))
    param.random_state = np.random.RandomState(int(seed))
    try:
        opt_cls = ng.optimizers.registry[optimizer]
    except KeyError:
        raise ConfigError(f"LoraHub optimizer={optimizer!r} is not a nevergrad optimizer") from None
    opt = opt_cls(parametrization=param, budget=int(budget), num_workers=int(population))
    history: list[float] = []
    problem = LoraHubProblem(lm, pool, inputs, targets, semantics=semantics, l1=l1, batch_size=batch_size,
                             max_len=max_len, loss_reduction=loss_reduction, max_groups=population)
    with warnings.catch_warnings(), problem:
        warnings.filterwarnings("ignore", message=".*RHOEND.*")  # scipy COBYLA (NGOpt's pick at N≈20, 1 worker)
        zero = float(problem.objective(np.zeros(n))[0])
        bar = tqdm(total=budget, desc=f"fit lorahub ({optimizer})", leave=False, unit="candidate")
        while len(history) < budget:
            cands = [opt.ask() for _ in range(min(population, budget - len(history)))]
            values = problem.objective(np.stack([c.value for c in cands]))
            for cand, value in zip(cands, values):
                opt.tell(cand, float(value))
            history.extend(float(v) for v in values)
            bar.update(len(values))
            bar.set_postfix(best=f"{min(history):.4f}", refresh=False)
        bar.close()
        weights = np.asarray(opt.provide_recommendation().value, dtype=np.float64)
        final = float(problem.objective(weights)[0])
    return SearchResult([float(w) for w in weights], final, zero, min(history), len(history), history, optimizer)


# --------------------------------------------------------------------------- the method


@register_method("lorahub")
class LoraHub(Method):
    def check_config(self) -> None:
        for s in self._semantics():
            if s not in SEMANTICS:
                raise ConfigError(f"method.semantics={s!r}; choose from {SEMANTICS}")
        if self.cfg.get("loss_reduction", "official") not in LOSS_REDUCTIONS:
            raise ConfigError(f"method.loss_reduction={self.cfg.loss_reduction!r}; choose from {LOSS_REDUCTIONS}")
        for key, low in (("budget", 1), ("population", 1), ("batch_size", 1)):
            if self.cfg.get(key) is not None and int(self.cfg[key]) < low:
                raise ConfigError(f"method.{key}={self.cfg[key]}: must be ≥ {low}")
        if float(self.cfg.get("bound", 1.5)) <= 0:
            raise ConfigError(f"method.bound={self.cfg.bound}: must be > 0")
        n = self.cfg.get("n")
        if n is not None and int(n) < 1:
            raise ConfigError(f"method.n={n}: must be ≥ 1 (or null for the whole pool)")

    def _semantics(self) -> list[str]:
        s = self.cfg.get("semantics", "official")
        return [s] if isinstance(s, str) else list(s)

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        cfg = self.cfg
        n = cfg.get("n", 20)
        pool = ctx.pool.sample(None if n is None else int(n), ctx.seed)
        inputs = [ctx.prompt(e) for e in ctx.fit_examples]
        targets = [e.train_target for e in ctx.fit_examples]
        for semantics in self._semantics():
            with Timer() as timer:
                result = lorahub_search(
                    ctx.model, pool, inputs, targets, semantics=semantics, budget=int(cfg.get("budget", 40)),
                    bound=float(cfg.get("bound", 1.5)), l1=float(cfg.get("l1", 0.05)), seed=int(ctx.seed),
                    population=int(cfg.get("population", 1)), optimizer=str(cfg.get("optimizer", "NGOpt")),
                    batch_size=None if cfg.get("batch_size") is None else int(cfg.batch_size),
                    max_len=int(cfg.get("max_len", 512)),
                    loss_reduction=str(cfg.get("loss_reduction", "official")),
                )
                compose = compose_official if semantics == "official" else compose_exact
                adapter = compose(pool, result.weights, name=f"lorahub-{semantics}")
            weights = dict(zip(pool.names, result.weights))
            adapter.metadata = {"method": "lorahub", "semantics": semantics, "weights": weights, "seed": ctx.seed}
            report = FitReport(
                examples=len(ctx.fit_examples), steps=result.evaluations, seconds=timer.seconds,
                trained_params=len(pool),
                info={"weights": weights, "semantics": semantics, "objective": result.objective,
                      "objective_at_zero": result.objective_at_zero, "best_seen": result.best_seen,
                      "optimizer": result.optimizer, "population": int(cfg.get("population", 1)),
                      "extra_evaluations": 2,  # w = 0 and the recommendation, for the record (in `seconds`)
                      "loss_reduction": str(cfg.get("loss_reduction", "official")), "experts": pool.names},
            )
            variant = "" if semantics == "official" else semantics
            with ctx.model.adapter_applied(adapter):
                yield Composed(ctx.model, report, variant, adapter)
