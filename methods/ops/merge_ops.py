"""Dense-delta merges shared by `method=ties|dare|magnitude_prune` (DESIGN §4), as plain tensor functions.

Every merge works module by module on the experts' dense updates ``Δ_i = s_i B_i A_i`` stacked into one
``(N, d_out, d_in)`` tensor, computed on the fly with one batched GEMM on whatever device the factors are
sent to. The steps are peft's `peft.utils.merge_utils` (`magnitude_based_pruning`, `random_pruning`,
`calculate_majority_sign_mask`, `disjoint_merge`, `task_arithmetic`) written on the stacked tensor, so
each step is one tensor op for all experts:

- trim: per expert, keep the magnitudes at least the ``int(density · numel)``-th largest (its value from
  a Triton radix select on a GPU, `torch.topk` elsewhere; the same value): peft's top-k set, except that
  entries tying at the threshold are all kept where topk keeps an arbitrary subset;
- drop (DARE): per expert, a Bernoulli(density) mask drawn with ``torch.bernoulli`` of a float32 tensor full
  of `density` from a generator seeded per module (`module_seed`) on the merge device, in expert order. The
  draw never depends on the factors' dtype: one seed gives one mask per device type (CPU and CUDA generators
  are different streams, so a CPU mask and a CUDA mask differ). It equals the mask peft's `random_pruning`
  draws after ``torch.manual_seed(module_seed(...))`` for float32 deltas on the same device (for deltas of
  another dtype peft draws in that dtype, hence other masks). The 1/density rescale is folded into the
  weights (equal up to rounding);
- elect (TIES): the majority sign per entry from the sum (``total``) or the count (``frequency``) of the
  pruned experts' signs; disjoint merge: the weighted sum of the agreeing entries divided by their count.

`tests/test_merges.py` checks each kind against peft's functions given the same inputs and seed. On a GPU
(wherever Triton runs), `merge_stacked` runs everything after the selection (trim, drop, elect, merge) as
one Triton kernel that reads the stacked deltas once instead of the ~10 passes of the eager ops
(`methods.ops.triton_merge`; tested against the eager ops under Triton's interpreter, and checked again on
the device by `bench.perf.merge` before timing).
Experts are put in name order first, so results do not depend on pool order (nor do DARE's masks).
"""

from __future__ import annotations

import zlib
from typing import Iterator, Sequence

import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.lora.pool import ExpertPool
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.linear import resolve_weights
from methods.ops import triton_merge

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


def _per_expert(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, …, 1), broadcastable against `like` (N, …)."""
    return t.view((-1,) + (1,) * (like.dim() - 1))


def trim_thresholds(stacked: torch.Tensor, density: float, magnitudes: torch.Tensor | None = None) -> torch.Tensor:
    """Per expert, the ``k = int(density · numel)``-th largest magnitude (+inf when k = 0), shaped to
    broadcast against `stacked`: keeping ``|x| ≥ τ`` keeps exactly the entries `torch.topk` keeps (peft's
    `magnitude_based_pruning`) unless magnitudes tie at τ, where all tied entries are kept (topk would
    keep an arbitrary, device-dependent subset of them). Where Triton runs (CUDA), τ comes from a radix
    select (`methods.ops.triton_merge`: three 5-bit histogram passes for 16-bit floats, bit-identical to topk's k-th value);
    elsewhere from `torch.topk` on `magnitudes` (``stacked.abs()`` when not given)."""
    rows = stacked.reshape(stacked.shape[0], -1)
    k = int(density * rows.shape[1])
    if k == 0:
        tau = torch.full((rows.shape[0],), float("inf"), dtype=rows.dtype, device=rows.device)
    elif triton_merge.available(rows):
        tau = triton_merge.kth_largest_magnitude(rows, k)
    else:
        tau = topk_kth_largest((stacked.abs() if magnitudes is None else magnitudes).reshape(rows.shape), k)
    return _per_expert(tau, stacked)


def topk_kth_largest(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of `rows` (R, M) by `torch.topk`: the threshold without Triton,
    and the reference and baseline of the radix select."""
    return rows.topk(k, dim=1, sorted=False).values.amin(1)


def dare_masks(stacked: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's keep-masks (N, …) as booleans, one ``torch.bernoulli`` draw per expert in order, from a float32
    probability tensor whatever `stacked`'s dtype (so a seed means one mask for float32 and float64 factors).

    One draw per expert, as peft's `random_pruning` makes on float32 deltas, keeps the random stream identical
    to peft's on the same device (a single stacked draw would match on CPU only). Written as bool: a quarter of
    the bytes of float32 masks."""
    p = torch.full(stacked.shape[1:], density, dtype=torch.float32, device=stacked.device)
    mask = torch.empty(stacked.shape, dtype=torch.bool, device=stacked.device)
    for i in range(stacked.shape[0]):
        torch.bernoulli(p, generator=generator, out=mask[i])
    return mask


def disjoint_merge_(stacked: torch.Tensor, weights: torch.Tensor, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES elect + disjoint merge (peft's `calculate_majority_sign_mask` + `disjoint_merge`): per entry,
    the weighted sum of the experts whose sign equals the elected sign, divided by how many they are.
    `majority_sign_method`: ``total`` (sign of the sum) or ``frequency`` (sign of the summed signs).
    Overwrites `stacked`: flipped to the elected sign, disagreeing entries zeroed."""
    elected = stacked.sum(0) if majority_sign_method == "total" else stacked.sign().sum(0)
    majority = (elected >= 0).to(stacked.dtype).mul_(2).sub_(1)  # +1 / -1
    agreeing = stacked.mul_(majority).clamp_(min=0)  # |x| where sign(x) = majority, else 0
    count = (agreeing > 0).sum(0, dtype=stacked.dtype).clamp_(min=1)
    return weighted_sum(agreeing, weights).mul_(majority).div_(count)


def merge_stacked(stacked: torch.Tensor, weights: Sequence[float] | torch.Tensor, kind: str, density: float = 1.0,
                  majority_sign_method: str = "total", generator: torch.Generator | None = None,
                  fused: bool | None = None) -> torch.Tensor:
    """Merge the stacked deltas ``(N, ...)`` of one module with `kind` (one of `KINDS`); consumes `stacked`.

    density 1 skips pruning (as peft's `prune` does). DARE kinds draw their masks from `generator`; their
    1/density rescale is folded into the weights (a positive factor changes no sign election).
    `fused`: run everything after the thresholds / the Bernoulli draws as one Triton kernel
    (`triton_merge.merge_tail`; same results up to rounding) instead of the eager ops; None: wherever
    Triton runs (CUDA)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown merge kind {kind!r}; expected one of {KINDS}")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"method.majority_sign_method={majority_sign_method!r}: must be one of {SIGN_METHODS}")
    w = torch.as_tensor(weights, dtype=torch.float64).to(stacked.device)
    trimming = density < 1.0 and kind in ("ties", "magnitude_prune")
    dropping = density < 1.0 and kind.startswith("dare")
    if dropping:
        w = w / density
    disjoint = kind in ("ties", "dare_ties")
    if (triton_merge.available(stacked) if fused is None else fused):
        n = stacked.shape[0]
        tau = trim_thresholds(stacked, density).reshape(n) if trimming else None
        mask = dare_masks(stacked, density, generator) if dropping else None
        merged = triton_merge.merge_tail(stacked.reshape(n, -1), w, tau, mask, disjoint, majority_sign_method == "total")
        return merged.view(stacked.shape[1:])
    if trimming:
        magnitudes = stacked.abs()
        stacked.mul_(magnitudes >= trim_thresholds(stacked, density, magnitudes))
        del magnitudes
    if dropping:
        stacked.mul_(dare_masks(stacked, density, generator))
    return disjoint_merge_(stacked, w, majority_sign_method) if disjoint else weighted_sum(stacked, w)


def merge_module(adapters: Sequence[LoraAdapter], weights: Sequence[float], module: str, kind: str,
                 density: float = 1.0, majority_sign_method: str = "total", generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 fused: bool | None = None) -> torch.Tensor:
    """The merged dense ΔW ``(d_out, d_in)`` of one module, experts taken in the order given."""
    A, B = stack_factors(adapters, module, dtype, device)
    return merge_stacked(expert_deltas(A, B), weights, kind, density, majority_sign_method, generator, fused)


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


def fold_loras_(folds: Sequence[tuple[torch.Tensor, LoraModule]], streams: int = 2) -> None:
    """`fold_lora_` for many modules. On a GPU, consecutive modules alternate between `streams` CUDA streams,
    so one module's GEMM overlaps another's memory-bound read-add-write of W (H100, 7B stack, N·r = 512:
    0.56 → 0.66 of copy bandwidth; results/perf/NOTES.md). Returns once the current stream sees every fold."""
    if not folds or folds[0][0].device.type != "cuda" or streams < 2:
        for weight, module in folds:
            fold_lora_(weight, module)
        return
    current = torch.cuda.current_stream(folds[0][0].device)
    side = [torch.cuda.Stream(folds[0][0].device) for _ in range(streams)]
    for stream in side:
        stream.wait_stream(current)
    for i, (weight, module) in enumerate(folds):
        with torch.cuda.stream(side[i % streams]):
            fold_lora_(weight, module)
    for stream in side:
        current.wait_stream(stream)


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

    def uses_seed(self) -> bool:
        return self.merge_kind().startswith("dare")  # only DARE draws (seeded) random masks

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
        kind = self.merge_kind()
        device = getattr(ctx.model, "device", None)
        with Timer() as timer:
            weights = self.weights(ctx.pool)
            deltas = merge_dense(list(ctx.pool), weights, kind, check_density(self.cfg.get("density", 1.0)),
                                 self.cfg.get("majority_sign_method", "total"), ctx.seed, device=device)
        yield from compose_deltas(self, ctx, deltas, timer.seconds, {"kind": kind, "weights": weights})


def compose_deltas(method: Method, ctx: FitContext, deltas: dict[str, torch.Tensor], seconds: float,
                   info: dict) -> Iterator[Composed]:
    """Yield the model with merged dense deltas: folded into the base weights (``fold: true``), or as a LoRA of
    ``rank`` (truncated SVD; null = max r_i) applied on top (``fold: false``)."""
    fold = bool(method.cfg.get("fold", True))
    adapter = None
    with Timer() as timer:
        if not fold:
            rank = check_rank(method.cfg.get("rank")) or max_rank(list(ctx.pool))
            adapter = dense_to_lora(deltas, rank, ctx.pool[0], name=method.registry_name)
            adapter.metadata = {"method": method.registry_name, "experts": ctx.pool.names, "seed": ctx.seed, **info}
    report = FitReport(seconds=seconds + timer.seconds, info={**info, "fold": fold})
    if fold:
        with ctx.model.deltas_folded(deltas):
            yield Composed(ctx.model, report, "", None)
    else:
        with ctx.model.adapter_applied(adapter):
            yield Composed(ctx.model, report, "", adapter)


class ModuleMergeMethod(Method):
    """A data-free merge computed module by module from the experts' factors (the 2024–26 merges: KnOTS, Core
    Space, TSV-M, Iso-C/CTS, WUDI, DELLA, Breadcrumbs). A subclass implements `merge_module`; this class gives
    it each module's factors in float64 on the model's device, experts in name order (pool order never
    matters, weights follow their experts), and turns the merged ΔW into the output (`compose_deltas`).

    Config keys every such method has: ``weights`` (null: `default_weights`), ``normalize``, ``fold``,
    ``rank``."""

    domains = ("nlp", "vl")
    seeded = False  # True when the merge draws random numbers (from a generator seeded per module)
    default_weights = "ones"  # "ones": w_i = 1 (task arithmetic's sum; λ scales it) | "mean": 1/N

    def uses_seed(self) -> bool:
        return self.seeded

    def check_config(self) -> None:
        check_rank(self.cfg.get("rank"))

    def weights(self, pool: ExpertPool) -> list[float]:
        cfg_weights = self.cfg.get("weights")
        if cfg_weights is None and self.default_weights == "ones":
            cfg_weights = [1.0] * len(pool)
        return resolve_weights(cfg_weights, pool, bool(self.cfg.get("normalize", False)))

    def merge_module(self, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """The merged ΔW (d_out, d_in) of one module from ``A (N, r, d_in)`` and ``s·B (N, d_out, r)`` (zero-padded
        to the largest rank, so ``Δ_i = B_i A_i``) and the weights (N,), all float64."""
        raise NotImplementedError

    def merge(self, adapters: Sequence[LoraAdapter], weights: Sequence[float], seed: int = 0,
              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Module path -> merged ΔW (float64) for every module."""
        adapters, weights = by_name(adapters, weights)
        return {module: self.merge_one(adapters, weights, module, seed, device) for module in adapters[0].modules}

    def merge_one(self, adapters: Sequence[LoraAdapter], weights: Sequence[float], module: str, seed: int = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """One module's merged ΔW (float64), experts taken in the order given (`merge` sorts them first)."""
        A, B = stack_factors(adapters, module, torch.float64, device)
        w = torch.tensor(list(weights), dtype=torch.float64, device=A.device)
        return self.merge_module(A, B, w, module_generator(seed, module, device) if self.seeded else None)

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        device = getattr(ctx.model, "device", None)
        with Timer() as timer:
            weights = self.weights(ctx.pool)
            deltas = self.merge(list(ctx.pool), weights, ctx.seed, device)
        yield from compose_deltas(self, ctx, deltas, timer.seconds, {"weights": weights})
