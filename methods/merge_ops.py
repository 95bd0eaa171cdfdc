"""Dense-delta merges shared by `method=ties|dare|magnitude_prune` (DESIGN §4), as plain tensor functions.

Every merge works module by module on the experts' dense updates ``Δ_i = s_i B_i A_i`` stacked into one
``(N, d_out, d_in)`` tensor, computed on the fly with one batched GEMM on whatever device the factors are
sent to. The steps are peft's `peft.utils.merge_utils` (`magnitude_based_pruning`, `random_pruning`,
`calculate_majority_sign_mask`, `disjoint_merge`, `task_arithmetic`) written on the stacked tensor, so
each step is one tensor op for all experts:

- trim: per expert, keep the ``int(density · numel)`` largest magnitudes (`torch.topk` on each row of
  the stacked tensor, as peft does on each expert's tensor);
- drop (DARE): per expert, a Bernoulli(density) mask drawn with ``torch.bernoulli(full_like(Δ_i, density))``
  from a generator seeded per module (`module_seed`), in expert order: exactly the draws peft's
  `random_pruning` makes after ``torch.manual_seed(module_seed(...))``, on CPU and GPU alike; the 1/density
  rescale is folded into the weights (equal up to rounding);
- elect (TIES): the majority sign per entry from the sum (``total``) or the count (``frequency``) of the
  pruned experts' signs; disjoint merge: the weighted sum of the agreeing entries divided by their count.

`tests/test_merges.py` checks each kind against peft's functions given the same inputs and seed.
Experts are put in name order first, so results do not depend on pool order (nor do DARE's masks).
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import torch

from bench.adapters import LoraAdapter, LoraModule
from bench.errors import ConfigError
from bench.pool import ExpertPool
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.linear import resolve_weights

KINDS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


# --------------------------------------------------------------------- validation and ordering


def check_density(density: float, field: str = "method.density") -> float:
    """`density` as a float in (0, 1], or a ConfigError naming `field`."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={density!r}: must be a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{field}={density}: must be in (0, 1]")
    return value


def check_rank(rank, field: str = "method.rank") -> int | None:
    """None, or an int ≥ 1 (a ConfigError naming `field` otherwise)."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{field}={rank!r}: must be an integer ≥ 1 (or null)")
    return rank


def by_name(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> tuple[list[LoraAdapter], list[float]]:
    """Adapters and their weights in name order: a canonical order, so pool order never matters."""
    order = sorted(range(len(adapters)), key=lambda i: adapters[i].name)
    return [adapters[i] for i in order], [float(weights[i]) for i in order]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges compute in by default: the factors' own, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def module_seed(seed: int, module: str) -> int:
    """The seed of one module's random draws: depends on the run seed and the module path only."""
    return zlib.crc32(f"{int(seed)}/{module}".encode())


# --------------------------------------------------------------------- stacked dense deltas


def stack_factors(adapters: Sequence[LoraAdapter], module: str, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (N, r, d_in)`` and ``s·B (N, d_out, r)`` of one module, zero-padded to the largest rank
    (padding adds exact zeros, so experts of different ranks stack without changing ``B @ A``)."""
    parts = [a.modules[module] for a in adapters]
    dtype = dtype or parts[0].A.dtype
    r = max(m.rank for m in parts)
    pad = torch.nn.functional.pad
    A = torch.stack([m.A if m.rank == r else pad(m.A, (0, 0, 0, r - m.rank)) for m in parts]).to(device, dtype)
    B = torch.stack([m.B if m.rank == r else pad(m.B, (0, r - m.rank)) for m in parts]).to(device, dtype)
    scales = torch.tensor([m.scale for m in parts], dtype=torch.float64).to(device, dtype)
    return A, B.mul_(scales.view(-1, 1, 1))


def expert_deltas(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The stacked dense updates ``Δ_i = (s_i B_i) A_i``: one batched GEMM, ``(N, d_out, d_in)``."""
    return torch.bmm(B, A)


def weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i stacked_i`` as one matrix product over the expert axis (peft's `task_arithmetic`)."""
    return torch.tensordot(weights.to(stacked.dtype), stacked, dims=1)


def prune_magnitude(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """Per expert, keep the ``int(density · numel)`` entries of largest magnitude (peft's
    `magnitude_based_pruning` on each row); returns a new tensor."""
    flat = stacked.reshape(stacked.shape[0], -1)
    k = int(density * flat.shape[1])
    idx = flat.abs().topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx)).view_as(stacked)


def prune_random_(stacked: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per expert (in order), zero entries with a Bernoulli(density) mask, in place, without rescaling.

    The loop over experts is deliberate: one draw per expert tensor, as peft's `random_pruning` does, keeps
    the random stream identical to peft's on every device (one stacked draw would match on CPU only)."""
    for i in range(stacked.shape[0]):
        stacked[i].mul_(torch.bernoulli(torch.full_like(stacked[i], density), generator=generator))
    return stacked


def disjoint_merge_(stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES elect + disjoint merge (peft's `calculate_majority_sign_mask` + `disjoint_merge`): per entry,
    the weighted sum of the experts whose sign equals the elected sign, divided by how many they are.
    Zeroes the disagreeing entries of `stacked` in place."""
    if majority_sign_method == "total":
        elected = stacked.sum(0)
    elif majority_sign_method == "frequency":
        elected = stacked.sign().sum(0)
    else:
        raise ConfigError(f"method.majority_sign_method={majority_sign_method!r}: must be one of {SIGN_METHODS}")
    majority = (elected >= 0).to(stacked.dtype).mul_(2).sub_(1)  # +1 / -1
    agree = (stacked * majority) > 0
    stacked.mul_(agree)
    count = agree.sum(0, dtype=stacked.dtype).clamp_(min=1)
    return weighted_sum(stacked, weights).div_(count)


def merge_stacked(stacked: torch.Tensor, weights: Sequence[float] | torch.Tensor, kind: str, density: float = 1.0,
                  majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge the stacked deltas ``(N, ...)`` of one module with `kind` (one of `KINDS`); consumes `stacked`.

    density 1 skips pruning (as peft's `prune` does). DARE kinds draw their masks from `generator`."""
    if kind not in KINDS:
        raise ConfigError(f"unknown merge kind {kind!r}; expected one of {KINDS}")
    w = torch.as_tensor(weights, dtype=torch.float64).to(stacked.device)
    if density < 1.0:
        if kind in ("ties", "magnitude_prune"):
            stacked = prune_magnitude(stacked, density)
        else:
            stacked = prune_random_(stacked, density, generator)
            w = w / density  # DARE's rescale; a positive factor changes no sign election
    if kind in ("ties", "dare_ties"):
        return disjoint_merge_(stacked, w, majority_sign_method)
    return weighted_sum(stacked, w)


def merge_module(adapters: Sequence[LoraAdapter], weights: Sequence[float], module: str, kind: str,
                 density: float = 1.0, majority_sign_method: str = "total", generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The merged dense ΔW ``(d_out, d_in)`` of one module, experts taken in the order given."""
    A, B = stack_factors(adapters, module, dtype, device)
    return merge_stacked(expert_deltas(A, B), weights, kind, density, majority_sign_method, generator)


def module_generator(seed: int, module: str, device: torch.device | str | None) -> torch.Generator:
    """A generator on `device` seeded with `module_seed(seed, module)`."""
    return torch.Generator(device=device or "cpu").manual_seed(module_seed(seed, module))


def merge_dense(adapters: Sequence[LoraAdapter], weights: Sequence[float], kind: str, density: float = 1.0,
                majority_sign_method: str = "total", seed: int = 0, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Module path -> merged dense ΔW for every module (experts in name order, DARE seeded per module),
    computed in `dtype` (default: the factors' dtype, at least float32) on `device`."""
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    density = check_density(density, field="density")
    adapters, weights = by_name(adapters, weights)
    dtype = dtype or compute_dtype(next(iter(adapters[0].modules.values())).A.dtype)
    random = kind.startswith("dare")
    return {
        module: merge_module(adapters, weights, module, kind, density, majority_sign_method,
                             module_generator(seed, module, device) if random else None, dtype, device)
        for module in adapters[0].modules
    }


# --------------------------------------------------------------------- outputs


def dense_to_lora(deltas: dict[str, torch.Tensor], rank: int, like: LoraAdapter, name: str) -> LoraAdapter:
    """Each dense ΔW as its best rank-`rank` LoRA (truncated SVD, ``B = U_k S_k``, ``A = V_kᵀ``, scale 1),
    as peft's ``*_svd`` combinations do; tensors in `like`'s dtype, on the deltas' device."""
    dtype = next(iter(like.modules.values())).A.dtype
    modules = {}
    for module, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        modules[module] = LoraModule(vh[:k].to(dtype), (u[:, :k] * s[:k]).to(dtype), 1.0)
    return LoraAdapter(name, like.base_model, modules, task_type=like.task_type)


def fold_lora_(weight: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """``W += scale · B @ A`` in place: one GEMM that reads and writes W once (no dense ΔW materialized)."""
    return weight.addmm_(module.B.to(weight.dtype), module.A.to(weight.dtype), alpha=module.scale)


def max_rank(adapters: Sequence[LoraAdapter]) -> int:
    return max(max(a.ranks) for a in adapters)


# --------------------------------------------------------------------- the shared method wrapper


class DenseMergeMethod(Method):
    """A dense-delta merge as a method: config ``weights``, ``normalize``, ``density``, ``fold``, ``rank``
    (+ ``majority_sign_method`` for sign-electing kinds). Subclasses set `kind` or override `merge_kind`."""

    domains = ("nlp", "vl")
    kind: str = ""
    #: weights=null means 1/N for summing kinds; 1 each for disjoint means (they already average).
    DISJOINT = ("ties", "dare_ties")

    def merge_kind(self) -> str:
        return self.kind

    def check_config(self) -> None:
        check_density(self.cfg.get("density", 1.0))
        check_rank(self.cfg.get("rank"))
        sign = self.cfg.get("majority_sign_method", "total")
        if sign not in SIGN_METHODS:
            raise ConfigError(f"method.majority_sign_method={sign!r}: must be one of {list(SIGN_METHODS)}")

    def weights(self, pool: ExpertPool) -> list[float]:
        cfg_weights = self.cfg.get("weights")
        if cfg_weights is None and self.merge_kind() in self.DISJOINT:
            cfg_weights = [1.0] * len(pool)
        return resolve_weights(cfg_weights, pool, bool(self.cfg.get("normalize", False)))

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        kind, fold = self.merge_kind(), bool(self.cfg.get("fold", True))
        device = getattr(ctx.model, "device", None)
        with Timer() as timer:
            weights = self.weights(ctx.pool)
            deltas = merge_dense(list(ctx.pool), weights, kind, check_density(self.cfg.get("density", 1.0)),
                                 self.cfg.get("majority_sign_method", "total"), ctx.seed, device=device)
            adapter = None
            if not fold:
                rank = check_rank(self.cfg.get("rank")) or max_rank(list(ctx.pool))
                adapter = dense_to_lora(deltas, rank, ctx.pool[0], name=self.registry_name)
                adapter.metadata = {"method": self.registry_name, "kind": kind, "experts": ctx.pool.names,
                                    "weights": weights, "seed": ctx.seed}
        report = FitReport(seconds=timer.seconds, info={"kind": kind, "weights": weights, "fold": fold})
        if fold:
            with ctx.model.deltas_folded(deltas):
                yield Composed(ctx.model, report, "", None)
        else:
            with ctx.model.adapter_applied(adapter):
                yield Composed(ctx.model, report, "", adapter)
