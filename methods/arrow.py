"""`method=arrow`: Arrow routing (Ostapenko et al., ICML 2024, "Towards Modular LLMs by Building and Reusing a
Library of LoRAs") and its GenKnowSub variant (Bagherifard et al., ACL 2025); gradient-free, no fit examples.

Arrow. For every LoRA'd linear layer and every expert i with update ``ΔW_i = s_i B_i A_i``, the expert's
prototype is the top right-singular vector ``v_i`` of ΔW_i (unit norm, defined up to sign; computed exactly in
float64 from the factors: thin QR of A_iᵀ and B_i, SVD of the r × r core, `top_right_singular_vectors`). Each
token x entering that layer (the layer's own input, so every layer routes on its own, cross-attention key/value
projections on the encoder tokens they read) is routed by

    score_i = |⟨x, v_i⟩|                                   sign-invariant, v_i unit: |cos(x, v_i)|·‖x‖
    g       = softmax over the top-k scores of score / T    (0 for the other experts)
    y       = W x + Σ_{i ∈ top-k} g_i s_i B_i A_i x

on the stacked N-expert layer (`bench.lora.stacked.StackedLoraLinear`, per-token gates through ``gate_fn``: one
(N × d_in) score GEMM, a top-k and a softmax on top of the stacked layer's two GEMMs). This is peft 0.21.2's
``ArrowLoraLinearLayer.forward`` (peft/tuners/lora/arrow.py) and the GenKnowSub authors' ``compute_weight``
(saharsamr/Modular-LLM, merging_lora_modules/arrow_routing.py): the score is the absolute *dot product*, not
divided by ‖x‖ (the choice of experts is the same as with |cos|; the softmax sees ‖x‖·|cos|), the temperature
divides the top-k scores (peft's ``router_temperature``), top-k then softmax over the k kept scores.
Differences from peft, none of which changes the math: the prototype is the exact top singular vector (peft: 15
steps of float32 power iteration from a random start, seeded by ``rng_seed``), so nothing here is random; scores
are computed in float32 (float64 for a float64 model) whatever the model's dtype (as the official code; peft:
the adapters' dtype); ranks may differ across experts (zero-padded by the stacked layer; peft needs one rank).

GenKnowSub (``gks: true``). With general-knowledge experts G (``general``, names of experts of the pool),
each task expert's *factors* are replaced, per layer, by their difference from the general experts' mean:

    A_i ← A_i − mean_{g∈G} A_g          B_i ← B_i − mean_{g∈G} B_g          s_i unchanged

before prototypes are computed, exactly as peft's ``gen_know_sub`` and the official code (``method ==
'subtract'`` with ``use_avg_lora``, cross_lingual_expert_organiser.py). It is a subtraction of factors, not of
ΔW (ΔW_i' = s_i (B_i − B̄)(A_i − Ā)), so general and task experts must have the same rank at every layer
(ConfigError otherwise); the general experts' own scales play no part (equal with the paper's equal ranks and
alphas; a differing scale is logged).

The general experts are never routed: the router sees the pool minus ``general``, with or without GenKnowSub
(so ``gks=false,true`` with the same ``general`` compares Arrow and GenKnowSub on the same routed experts, as
peft, which loads general adapters only for the subtraction). The project's pools carry no general adapters of
their own, so GenKnowSub needs ``general`` to name them: ``gks: true`` with an empty ``general`` is refused
(ConfigError naming ``method.general``) rather than replaced by a default such as the mean of all experts,
which would be a different method (a centring of the pool, not a general-knowledge LoRA).

``top_k`` larger than the number of routed experts is clamped to it (all experts, softmax over all scores; the
value used is recorded as ``top_k_used``). With top_k = N and T → ∞ every token gets the uniform mixture 1/N;
top_k = 1 routes each token to one expert at weight 1.

Recorded (``FitReport.info``): the routed experts, the general ones, ``top_k``/``top_k_used``, ``temperature``,
``gks``, the prototype time, and ``prototype_overlap``: the mean |⟨v_i, v_j⟩| over expert pairs and layers (how
alike the experts look to the router; GenKnowSub's claim is that subtraction makes them more distinct).
Variant: ``gks`` with GenKnowSub, "" without.

For benchmarks: `routed_forward(layer, x, prototypes, top_k, T)` is the live routed layer forward (what the
model runs per LoRA'd layer); `fused_routed_weight` / `fused_routed_forward` add the prototypes as N more rows of
the stacked layer's fused ``[W; A_cat]`` GEMM, so routing costs N more output columns of one GEMM plus a top-k
and a softmax (a serving layout; scores in the GEMM's dtype).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator, Sequence

import torch
from torch.nn import functional as F

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from bench.lora.stacked import StackedLoraLinear
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.ops.gates import router_attached

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- prototypes
def top_right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of each ``B_i @ A_i`` (any positive scale gives the same), exactly, in float64,
    without forming it: ``A_iᵀ = Q_a R_a``, ``B_i = Q_b R_b``, so ``B_i A_i = Q_b (R_b R_aᵀ) Q_aᵀ`` and the top
    right-singular vector is ``Q_a`` times that of the small core. A (N, r, d_in), B (N, d_out, r) -> (N, d_in),
    unit norm, sign fixed (largest-magnitude entry positive). A zero update gives an arbitrary unit vector."""
    A64, B64 = A.double(), B.double()
    Qa, Ra = torch.linalg.qr(A64.mT)  # (N, d_in, k), (N, k, r)
    Qb, Rb = torch.linalg.qr(B64)  # (N, d_out, k'), (N, k', r)
    core = Rb @ Ra.mT  # (N, k', k)
    _, _, Vh = torch.linalg.svd(core, full_matrices=False)
    v = (Qa @ Vh[:, 0, :, None])[..., 0]  # (N, d_in)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    pivot = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    return v * torch.where(pivot < 0, -1.0, 1.0)


def module_prototypes(modules: Sequence[LoraModule]) -> torch.Tensor:
    """Prototypes (N, d_in) float64 of one layer's experts (ranks may differ: zero-padded)."""
    r = max(m.rank for m in modules)
    d_in, d_out = modules[0].d_in, modules[0].d_out
    A = torch.zeros(len(modules), r, d_in, dtype=torch.float64)
    B = torch.zeros(len(modules), d_out, r, dtype=torch.float64)
    for i, m in enumerate(modules):
        A[i, : m.rank] = m.A.detach().to("cpu", torch.float64)
        B[i, :, : m.rank] = m.B.detach().to("cpu", torch.float64) * m.scale
    return top_right_singular_vectors(A, B)


def arrow_prototypes(pool: ExpertPool) -> dict[str, torch.Tensor]:
    """{module path: (N, d_in) float64 prototypes in pool order} for every module the pool adapts."""
    return {path: module_prototypes([a.modules[path] for a in pool]) for path in pool.module_names}


def prototype_overlap(prototypes: dict[str, torch.Tensor]) -> float | None:
    """Mean |⟨v_i, v_j⟩| over expert pairs i ≠ j and layers (None for one expert)."""
    values = []
    for P in prototypes.values():
        n = P.shape[0]
        if n < 2:
            return None
        G = (P @ P.T).abs()
        values.append(float((G.sum() - G.diagonal().sum()) / (n * (n - 1))))
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------- GenKnowSub
def gen_know_sub(task: Sequence[LoraAdapter], general: Sequence[LoraAdapter]) -> list[LoraAdapter]:
    """Each task adapter with, at every layer, ``A_i − mean_g A_g`` and ``B_i − mean_g B_g`` (scale s_i kept):
    peft's ``ArrowLoraLinearLayer.gen_know_sub``. Computed in float64, stored in the task factors' dtype."""
    if not general:
        raise ConfigError("method.general: GenKnowSub needs at least one general expert")
    out = []
    means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path in task[0].modules:
        gm = [g.modules[path] for g in general]
        ranks = {m.rank for m in gm}
        if len(ranks) != 1:
            raise ConfigError(f"method.general: GenKnowSub subtracts factors, so the general experts need one rank; "
                              f"at {path} they have {sorted(ranks)}")
        means[path] = (torch.stack([m.A.detach().to("cpu", torch.float64) for m in gm]).mean(0),
                       torch.stack([m.B.detach().to("cpu", torch.float64) for m in gm]).mean(0))
    scales_logged = False
    for adapter in task:
        modules = {}
        for path, m in adapter.modules.items():
            A_bar, B_bar = means[path]
            if m.rank != A_bar.shape[0]:
                raise ConfigError(f"method.general: GenKnowSub subtracts factors, so task and general experts need "
                                  f"the same rank; at {path} {adapter.name!r} has rank {m.rank}, the general "
                                  f"experts {A_bar.shape[0]}")
            if not scales_logged and any(abs(g.modules[path].scale - m.scale) > 1e-12 * abs(m.scale) for g in general):
                log.warning("GenKnowSub: general and task experts have different LoRA scales (e.g. at %s); as peft, "
                            "the factors are subtracted and each task expert keeps its own scale", path)
                scales_logged = True
            modules[path] = LoraModule((m.A.double().cpu() - A_bar).to(m.A.dtype),
                                       (m.B.double().cpu() - B_bar).to(m.B.dtype), m.scale)
        out.append(LoraAdapter(adapter.name, adapter.base_model, modules, adapter.use_rslora, adapter.task_type,
                               {**adapter.metadata, "gen_know_sub": [g.name for g in general]}))
    return out


def split_pool(pool: ExpertPool, general: Sequence[str]) -> tuple[ExpertPool, list[LoraAdapter]]:
    """(the routed experts: the pool minus `general`, in pool order; the general experts, in `general`'s order)."""
    missing = [n for n in general if n not in pool.names]
    if missing:
        raise ConfigError(f"method.general: experts {missing} are not in the pool {pool.names}")
    routed = [a for a in pool if a.name not in general]
    if not routed:
        raise ConfigError(f"method.general names every expert of the pool {pool.names}; Arrow needs ≥ 1 task expert")
    by_name = {a.name: a for a in pool}
    return ExpertPool(pool.base_model, routed), [by_name[n] for n in general]


# ----------------------------------------------------------------------------------------- routing
def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores in float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def gates_from_scores(scores: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """(..., N) scores -> (..., N) gates: softmax of the top-k scores / T, 0 elsewhere (top_k ≥ N: all)."""
    n = scores.shape[-1]
    if top_k >= n:
        return torch.softmax(scores / temperature, dim=-1)
    top, idx = scores.topk(top_k, dim=-1)
    return torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top / temperature, dim=-1))


def arrow_gates(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Per-token Arrow gates: x (..., d_in), prototypes (N, d_in) in the routing dtype -> (..., N)."""
    return gates_from_scores(F.linear(x.to(prototypes.dtype), prototypes).abs(), top_k, temperature)


def routed_forward(layer: StackedLoraLinear, x: torch.Tensor, prototypes: torch.Tensor, top_k: int,
                   temperature: float) -> torch.Tensor:
    """The Arrow-routed layer: ``W x + Σ_i g_i(x) s_i B_i A_i x``, as the model runs it (benchmarks time this)."""
    return layer.gated_forward(x, layer.project(x), arrow_gates(x, prototypes, top_k, temperature))


def fused_routed_weight(layer: StackedLoraLinear, prototypes: torch.Tensor) -> torch.Tensor:
    """``[W; A_cat; P]`` (d_out + N·r + N, d_in) in the base dtype: base, expert projections and routing scores
    as one GEMM (a copy of W: for benchmarks and serving layouts)."""
    dtype = layer.base.weight.dtype
    return torch.cat([layer.base.weight, layer.A_cat.to(dtype), prototypes.to(layer.base.weight.device, dtype)])


def fused_routed_forward(x: torch.Tensor, w_cat: torch.Tensor, B_cat: torch.Tensor, n_experts: int, rank: int,
                         top_k: int, temperature: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The routed layer from `fused_routed_weight`: ``[y | h | s] = x [W; A_cat; P]ᵀ`` (one GEMM), gates from
    |s| (computed in float32 from the GEMM's output), ``y += (h ⊙ expand(g)) B_catᵀ`` in place (one addmm_).
    Inference only; returns y as a strided view of the fused output."""
    nr = n_experts * rank
    d_out = w_cat.shape[0] - nr - n_experts
    out = F.linear(x, w_cat)
    scores = out[..., d_out + nr:].to(routing_dtype(out.dtype)).abs()
    g = gates_from_scores(scores, top_k, temperature).to(out.dtype)
    h = out[..., d_out:d_out + nr].unflatten(-1, (n_experts, rank)) * g.unsqueeze(-1)
    flat = out.view(-1, out.shape[-1])
    flat[:, :d_out].addmm_(h.reshape(-1, nr), B_cat.t())
    if bias is not None:
        flat[:, :d_out].add_(bias)
    return out[..., :d_out]


class ArrowRouter:
    """Arrow gates on every stacked layer: each layer's ``gate_fn`` routes the layer's own input tokens."""

    def __init__(self, layers: dict[str, StackedLoraLinear], prototypes: dict[str, torch.Tensor], top_k: int,
                 temperature: float) -> None:
        missing = [p for p in layers if p not in prototypes]
        if missing:
            raise ValueError(f"Arrow: no prototypes for {missing[:3]}")
        self.layers, self.top_k, self.temperature = layers, int(top_k), float(temperature)
        self.prototypes: dict[str, torch.Tensor] = {}
        for path, layer in layers.items():
            P = prototypes[path]
            if P.shape != (layer.n_experts, layer.in_features):
                raise ValueError(f"Arrow: prototypes of {path} are {tuple(P.shape)}, the layer has "
                                 f"{layer.n_experts} experts of input width {layer.in_features}")
            self.prototypes[path] = P.to(layer.A_cat.device, routing_dtype(layer.A_cat.dtype))
        self.record = False
        self.records: list[tuple[str, torch.Tensor]] = []  # (module path, gates) per forward while `record`
        for path, layer in layers.items():
            layer.gate_fn = functools.partial(self._gates, path)

    def gates(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return arrow_gates(x, self.prototypes[path], self.top_k, self.temperature)

    def _gates(self, path: str, layer: StackedLoraLinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = self.gates(path, x)
        if self.record:
            self.records.append((path, w.detach()))
        return w

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.gate_fn = None


@contextlib.contextmanager
def arrow_attached(lm, pool: ExpertPool, top_k: int = 3, temperature: float = 1.0,
                   prototypes: dict[str, torch.Tensor] | None = None) -> Iterator[ArrowRouter]:
    """`lm`'s model with the pool's experts stacked and Arrow routing on every LoRA'd layer, for the span of the
    block (`prototypes` from `arrow_prototypes(pool)`, computed when not given)."""
    protos = arrow_prototypes(pool) if prototypes is None else prototypes
    k = min(int(top_k), len(pool))
    with router_attached(lm, pool, lambda model, layers: ArrowRouter(layers, protos, k, temperature)) as router:
        yield router


# ----------------------------------------------------------------------------------------- the method
def _names(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"method.general={value!r}: a list of expert names (or null / [])")
    return list(dict.fromkeys(value))


@register_method("arrow")
class Arrow(Method):
    domains = ("nlp",)

    def uses_seed(self) -> bool:
        return False  # exact prototypes, deterministic routing, no fit examples

    def check_config(self) -> None:
        top_k = self.cfg.get("top_k", 3)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"method.top_k={top_k!r}: an integer ≥ 1")
        temperature = self.cfg.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"method.temperature={temperature!r}: a number > 0")
        gks = self.cfg.get("gks", False)
        if not isinstance(gks, bool):
            raise ConfigError(f"method.gks={gks!r}: true or false")
        general = _names(self.cfg.get("general"))
        if gks and not general:
            raise ConfigError("method.general is empty but method.gks=true: GenKnowSub subtracts the mean of the "
                              "general-knowledge experts, so name them (method.general=[name, ...], experts of the pool)")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        cfg = self.cfg
        top_k, temperature = int(cfg.get("top_k", 3)), float(cfg.get("temperature", 1.0))
        gks, general_names = bool(cfg.get("gks", False)), _names(cfg.get("general"))
        with Timer() as timer:
            routed, general = split_pool(ctx.pool, general_names)
            if gks:
                routed = ExpertPool(routed.base_model, gen_know_sub(routed.adapters, general))
            prototypes = arrow_prototypes(routed)
        info = {"experts": routed.names, "general": [g.name for g in general], "gks": gks, "top_k": top_k,
                "top_k_used": min(top_k, len(routed)), "temperature": temperature,
                "prototype_seconds": timer.seconds, "prototype_overlap": prototype_overlap(prototypes)}
        with arrow_attached(ctx.model, routed, top_k, temperature, prototypes):
            report = FitReport(examples=0, steps=0, seconds=timer.seconds, trained_params=0, info=info)
            yield Composed(ctx.model, report, "gks" if gks else "")
