"""N frozen LoRA experts of one linear layer computed as one stacked LoRA (DESIGN §4), for language models
(MoLE, LoRA-Flow, MoA, the text forms of Switch / Composite) and diffusion (MoLE on the UNet, LoRA Switch,
LoRA Composite, through `bench.models.diffusion.ExpertMix`) alike.

For a target layer with base weight W and experts (A_i, B_i, s_i), ranks padded to r = max r_i with zero
rows/columns (which contribute nothing):

    h      = x @ A_catᵀ                       A_cat = [A_1; …; A_N]          (N·r × d_in)
    Δh_i   = h[..., i-th rank block] @ (s_i B_i)ᵀ                              (per-expert outputs)
    y      = W x + (h ⊙ expand(g)) @ B_catᵀ   B_cat = [s_1 B_1, …, s_N B_N]  (d_out × N·r)
           = W x + Σ_i g_i Δh_i

The gate `g` is per layer (N,), per row (batch, N: broadcast over every dimension between the batch and the
features, a sequence's tokens or an image's spatial positions) or per token (batch, seq, N). Gates come from
`layer.gates` (set by a method before a forward pass), from `layer.gate_fn(layer, x, h)`, a callable that
returns this forward's gates (MoLE, whose gates depend on the experts' outputs; LoRA-Flow, on the block
input), or `layer.controller(layer, x, h)`, a callable that returns the layer's whole LoRA output.
`layer.mix(layer, x)`, when set, runs the whole forward instead: a mode shared by all layers of a model that
picks its path before any expert math (`bench.models.diffusion.ExpertMix`: off, one expert alone, weighted, gated).
One expert alone (`single_delta`): ``c · s_i B_i A_i x`` from that expert's own r_i ranks only.
No Python loop over experts anywhere in the forward.

Kernels per gated forward (inference): base GEMM, the A_cat GEMM, one broadcast multiply (h viewed as
(…, N, r) times g as (…, N, 1): the expanded gate is never materialized) and the B_cat GEMM accumulating into
the base output in place (`addmm_`). With autograd recording, the out-of-place `base(x) + delta` is used.
`fused_forward` goes one step further for benchmarks and serving: `[W; A_cat]` as one GEMM (bench/perf/gated.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from bench.lora.adapters import LoraModule
from bench.lora.pool import ExpertPool

Controller = Callable[["StackedLoraLinear", torch.Tensor, torch.Tensor], torch.Tensor]
GateFn = Callable[["StackedLoraLinear", torch.Tensor, torch.Tensor], torch.Tensor]
Mix = Callable[["StackedLoraLinear", torch.Tensor], torch.Tensor]


class WrappedLinear(nn.Module):
    """A module standing in for the linear layer `self.base`: code that reads a linear layer's
    ``in_features``, ``out_features`` or ``weight`` (peft, transformers' init checks) sees the base's."""

    base: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight


class StackedLoraLinear(WrappedLinear):
    """A frozen linear layer plus N frozen LoRA experts, gated without a loop over experts."""

    def __init__(self, base: nn.Linear, experts: list[LoraModule], path: str = "") -> None:
        super().__init__()
        self.base, self.path = base, path  # path: the module path it stands in for (gates keyed by layer read it)
        self.n_experts = len(experts)
        self.ranks = [m.rank for m in experts]
        self.rank = max(self.ranks)
        dtype, device = base.weight.dtype, base.weight.device
        A = torch.zeros(self.n_experts, self.rank, base.in_features, dtype=dtype, device=device)
        B = torch.zeros(self.n_experts, base.out_features, self.rank, dtype=dtype, device=device)
        for i, m in enumerate(experts):
            A[i, : m.rank] = m.A.to(device, dtype)
            B[i, :, : m.rank] = (m.scale * m.B.double()).to(device, dtype)
        self.register_buffer("A", A, persistent=False)  # (N, r, d_in)
        self.register_buffer("B", B, persistent=False)  # (N, d_out, r), scales folded in
        self.register_buffer("A_cat", A.reshape(-1, base.in_features), persistent=False)  # (N·r, d_in)
        self.register_buffer("B_cat", B.permute(1, 0, 2).reshape(base.out_features, -1).contiguous(),
                             persistent=False)  # (d_out, N·r)
        self.gates: torch.Tensor | None = None
        self.controller: Controller | None = None
        self.gate_fn: GateFn | None = None  # (layer, x, h) -> gates for this forward; used when controller is None
        self.mix: Mix | None = None  # (layer, x) -> this forward's output, in place of all of the above

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """h = x @ A_catᵀ: every expert's rank activations at once, (..., N·r)."""
        return F.linear(x, self.A_cat)

    def expert_outputs(self, h: torch.Tensor) -> torch.Tensor:
        """Per-expert outputs Δh_i = s_i B_i h_i, shape (..., N, d_out)."""
        return torch.einsum("...nr,nor->...no", h.unflatten(-1, (self.n_experts, self.rank)), self.B)

    def combine(self, h: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """Σ_i g_i Δh_i from the rank activations, as one GEMM: (h ⊙ expand(g)) @ B_catᵀ.

        `gates`: None (all experts at weight 1), (N,), (batch, N) or (batch, seq, N) for h of shape
        (batch, …, N·r); (batch, N) broadcasts over every dimension between batch and ranks.
        """
        return F.linear(self.gate_ranks(h, gates), self.B_cat)

    def gate_ranks(self, h: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """h ⊙ expand(g): each expert's r rank activations scaled by its gate, through a broadcast view
        (h viewed as (..., N, r) times g as (..., N, 1)), so the expanded gate is never materialized."""
        if gates is None:
            return h
        return (h.unflatten(-1, (self.n_experts, self.rank)) * _gate_view(gates, h)).flatten(-2)

    def combine_into(self, y: torch.Tensor, h: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """``y += Σ_i g_i Δh_i`` in place, the B GEMM accumulating straight into `y` (one ``addmm_``, no
        separate delta tensor and no extra elementwise add); returns `y`. `y` must be contiguous."""
        hg = self.gate_ranks(h, gates)
        y.view(-1, y.shape[-1]).addmm_(hg.reshape(-1, hg.shape[-1]), self.B_cat.t())
        return y

    def single_delta(self, x: torch.Tensor, expert: int, scale: float = 1.0) -> torch.Tensor:
        """``scale · s_i B_i A_i x`` for expert i alone, from its own r_i ranks only (two thin GEMMs)."""
        r = self.ranks[expert]
        return scale * F.linear(F.linear(x, self.A[expert, :r]), self.B[expert, :, :r])

    def gated_forward(self, x: torch.Tensor, h: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """``W x + Σ_i g_i Δh_i`` from the rank activations `h`: the B GEMM accumulates into the base output in
        place (`combine_into`) unless autograd records (or the base output is not contiguous)."""
        y = self.base(x)
        if not y.is_contiguous() or torch.is_grad_enabled() and (
            y.requires_grad or h.requires_grad or (gates is not None and gates.requires_grad)
        ):
            return y + self.combine(h, gates)  # autograd-safe out-of-place path
        return self.combine_into(y, h, gates)

    def fused_weight(self) -> torch.Tensor:
        """``[W; A_cat]`` (d_out + N·r, d_in): base and expert projections as one GEMM (see `fused_forward`).
        A copy of W: meant for benchmarks and serving stacks that own their weights, not for the live model."""
        return torch.cat([self.base.weight, self.A_cat.to(self.base.weight.dtype)], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix is not None:
            return self.mix(self, x)
        h = self.project(x)
        if self.controller is not None:
            return self.base(x) + self.controller(self, x, h)
        return self.gated_forward(x, h, self.gate_fn(self, x, h) if self.gate_fn is not None else self.gates)


def _gate_view(gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Gates (N,), (batch, N) or (batch, seq, N) as (…, N, 1) in h's dtype, broadcasting against h viewed as
    (…, N, r); per-row gates (batch, N) broadcast over every dimension of h between the batch and the ranks."""
    g = gates.to(h.dtype)
    if g.dim() == 2 and h.dim() > 2:
        g = g.view(g.shape[0], *[1] * (h.dim() - 2), g.shape[1])
    return g.unsqueeze(-1)


def fused_forward(x: torch.Tensor, w_cat: torch.Tensor, B_cat: torch.Tensor, gates: torch.Tensor | None,
                  n_experts: int, rank: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The gated layer with the expert projection fused into the base GEMM:

        [y | h] = x @ [W; A_cat]ᵀ        one GEMM, d_out + N·r output columns (h: the experts' rank activations)
        y      += (h ⊙ expand(g)) @ B_catᵀ  one addmm_ accumulating into the base output's storage

    Two GEMMs and one small elementwise op per call, against four or five kernels for
    `StackedLoraLinear.forward`. Returns y as a strided view of the fused output (rows of d_out + N·r).
    `w_cat` from `StackedLoraLinear.fused_weight()`; gates (N,), (batch, N) or (batch, seq, N); inference only.
    """
    d_out = w_cat.shape[0] - n_experts * rank
    out = F.linear(x, w_cat)
    flat = out.view(-1, out.shape[-1])
    h = out[..., d_out:]
    if gates is not None:
        h = h.unflatten(-1, (n_experts, rank)) * _gate_view(gates, h)
    flat[:, :d_out].addmm_(h.reshape(-1, n_experts * rank), B_cat.t())
    if bias is not None:
        flat[:, :d_out].add_(bias)
    return out[..., :d_out]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


@contextlib.contextmanager
def stacked_experts(model: nn.Module, pool: ExpertPool) -> Iterator[dict[str, StackedLoraLinear]]:
    """Replace each targeted linear layer of `model` by a `StackedLoraLinear` over the pool's experts for the
    span of the block; yields {module path: layer} in model order; the original layers are put back after."""
    pool.check_model(model)
    layers: dict[str, StackedLoraLinear] = {}
    try:
        for path in pool.module_names:
            parent, child = _parent(model, path)
            base = getattr(parent, child)
            stacked = StackedLoraLinear(base, [adapter.modules[path] for adapter in pool], path)
            setattr(parent, child, stacked)
            layers[path] = stacked
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        yield dict(sorted(layers.items(), key=lambda kv: order.get(kv[0], 0)))
    finally:
        for path, stacked in layers.items():
            parent, child = _parent(model, path)
            setattr(parent, child, stacked.base)


def set_gates(layers: dict[str, StackedLoraLinear], gates: torch.Tensor | None) -> None:
    """The same gates on every layer (e.g. one-hot per batch row to route each input to one expert)."""
    for layer in layers.values():
        layer.gates = gates


def block_of(path: str) -> str:
    """The transformer block a module path belongs to: the path up to and including the first number
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``; ``encoder.block.1.layer.0.SelfAttention.q``
    -> ``encoder.block.1``); the whole path when it has no number."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return path
