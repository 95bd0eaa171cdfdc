"""`method=lora_lego`: LoRA-LEGO (Zhao et al., ICLR 2025): merge LoRAs by clustering their rank-1 units.

Units. Rank j of expert i is the unit ``u_ij = [A_i[j,:], s_i B_i[:,j]]`` (length d_in + d_out). Any set
of units is a LoRA: stacking units as the rows of A and the columns of B (scale 1) gives
``Σ_units b aᵀ``, so stacking all units reproduces ``Σ_i s_i B_i A_i`` exactly, in any order.

Clustering. Per module, the ``R = Σ r_i`` units are split into k clusters (default k = max r_i) by
k-means with k-means++ initialisation (one seeded draw per centre, D² sampling) and Lloyd iterations
until the assignment stops changing (at most `max_iter`). Everything runs in torch on the units' device
and is batched over *all modules of the stack at once*: k-means only needs the units' Gram matrix
``K = U Uᵀ`` (R × R), since a centroid is a mean of units, ``c = W U`` with W the (k × R) averaging
matrix, and ``‖u_i − c_j‖² = K_ii − 2 (K Wᵀ)_ij + (W K Wᵀ)_jj``. So one batched GEMM per module shape
builds K, then every k-means step is one tensor op over a ``(modules, R, R)`` stack, and a last GEMM
forms the centroids. Ties go to the lowest index; a cluster that empties keeps its previous centre while
iterating and contributes nothing at the end. With k ≥ R every unit is its own cluster (no k-means;
output rank R), which is also how duplicate units stay exact.

Each centroid ``c = [a_c, b_c]`` becomes one rank of the merged LoRA (``A[c] = a_c``, ``B[:, c] = b_c``,
scale 1). Dual reweighting (the paper's code is not public; these are our formulas, each switchable):

1. ``param_reweight``: rescale each centroid, as a vector of length d_in + d_out, to the mean norm of its
   member units: ``c ← c · mean_{u∈c} ‖u‖ / ‖c‖`` (undoes the norm decay of averaging; its rank-1
   product scales by the square of that factor).
2. ``output_reweight``: one factor γ per module on the merged B so the merged update's Frobenius norm
   equals that of the exact sum, ``γ = ‖Σ_i s_i B_i A_i‖_F / ‖B' A'‖_F``, both norms from the Gram
   matrices (``‖U_bᵀ U_a‖²_F = Σ (U_a U_aᵀ) ∘ (U_b U_bᵀ)``), never from dense matrices.

Inputs may have different ranks; one LoRA with k < r is shrunk to rank k (`lego_shrink`). Experts are put
in name order first, so pool order never changes the result. Seeded: the same seed on the same device
gives the same clusters.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch

from bench.adapters import LoraAdapter, LoraModule
from bench.errors import ConfigError
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.merge_ops import check_rank, compute_dtype, max_rank

Units = tuple[torch.Tensor, torch.Tensor]  # U_a (G, R, d_in), U_b (G, R, d_out): G modules of one shape


def module_units(adapters: Sequence[LoraAdapter], module: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Units:
    """One module's units as rows: ``U_a (R, d_in)`` = the A rows, ``U_b (R, d_out)`` = the s·B columns."""
    parts = [a.modules[module] for a in adapters]
    ua = torch.cat([m.A.to(device, dtype) for m in parts])
    ub = torch.cat([m.B.to(device, dtype).T * m.scale for m in parts])
    return ua, ub


def unit_groups(adapters: Sequence[LoraAdapter], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> dict[int, list[tuple[list[str], Units]]]:
    """Every module's units, stacked per shape and grouped by unit count R (one k-means batch per R):
    ``{R: [(module names, (U_a (G, R, d_in), U_b (G, R, d_out))), ...]}``, R and shapes in sorted order."""
    by_r: dict[int, dict[tuple[int, int], list[str]]] = defaultdict(lambda: defaultdict(list))
    for module, m in adapters[0].modules.items():
        R = sum(a.modules[module].rank for a in adapters)
        by_r[R][(m.d_in, m.d_out)].append(module)
    out = {}
    for R in sorted(by_r):
        out[R] = []
        for shape in sorted(by_r[R]):
            names = by_r[R][shape]
            units = [module_units(adapters, mod, dtype, device) for mod in names]
            out[R].append((names, (torch.stack([u[0] for u in units]), torch.stack([u[1] for u in units]))))
    return out


def kmeans_gram(K: torch.Tensor, k: int, generator: torch.Generator | None = None,
                max_iter: int = 100) -> tuple[torch.Tensor, int]:
    """Batched k-means on Gram matrices ``K (G, R, R)``: cluster index per point ``(G, R)``, iterations run.

    k-means++ init (first centre uniform, then D² sampling; if every remaining point is at distance 0,
    the next unchosen point in index order), then Lloyd steps until the assignment is stable."""
    G, R, _ = K.shape
    if k >= R:
        return torch.arange(R, device=K.device).expand(G, R).clone(), 0
    sq = K.diagonal(dim1=1, dim2=2)  # ‖u_i‖²

    def dist_to(idx: torch.Tensor) -> torch.Tensor:  # ‖u_i − u_idx‖², (G, R)
        k_col = K.gather(2, idx.view(G, 1, 1).expand(G, R, 1)).squeeze(2)
        return (sq - 2 * k_col + sq.gather(1, idx.view(G, 1))).clamp_(min=0)

    chosen = torch.zeros(G, R, dtype=torch.bool, device=K.device)
    first = torch.multinomial(torch.ones(G, R, dtype=K.dtype, device=K.device), 1, generator=generator).squeeze(1)
    centres = [first]
    chosen.scatter_(1, first.view(G, 1), True)
    d2 = dist_to(first)
    for _ in range(1, k):
        p = d2.masked_fill(chosen, 0)
        p = torch.where(p.sum(1, keepdim=True) > 0, p, (~chosen).to(p.dtype))
        nxt = torch.multinomial(p, 1, generator=generator).squeeze(1)
        centres.append(nxt)
        chosen.scatter_(1, nxt.view(G, 1), True)
        d2 = torch.minimum(d2, dist_to(nxt))
    W = torch.zeros(G, k, R, dtype=K.dtype, device=K.device).scatter_(2, torch.stack(centres, 1).unsqueeze(2), 1.0)

    assign, it = None, 0
    for it in range(1, max_iter + 1):
        KW = torch.bmm(K, W.transpose(1, 2))  # (G, R, k): u_i · c_j
        cc = (W * KW.transpose(1, 2)).sum(2)  # (G, k): ‖c_j‖²
        new = (cc.unsqueeze(1) - 2 * KW).argmin(2)  # ‖u_i‖² is constant per row
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        M = _members(assign, k).to(K.dtype)
        counts = M.sum(2, keepdim=True)
        W = torch.where(counts > 0, M / counts.clamp(min=1), W)  # an emptied cluster keeps its centre
    return assign, it


def _members(assign: torch.Tensor, k: int) -> torch.Tensor:
    """Membership matrix ``(G, k, R)`` of 0/1 (as bool)."""
    return torch.nn.functional.one_hot(assign, k).transpose(1, 2).bool()


def averaging(assign: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``W (G, k, R)``: row j averages the members of cluster j (all zeros for an empty cluster)."""
    M = _members(assign, k).to(dtype)
    return M / M.sum(2, keepdim=True).clamp(min=1)


def lego_cluster(groups: Sequence[Units], k: int, generator: torch.Generator | None = None, max_iter: int = 100,
                 param_reweight: bool = True, output_reweight: bool = True) -> tuple[list[Units], dict]:
    """Cluster the units of every module in `groups` (all with the same R) in one batched k-means.

    Returns per group the merged factors ``(A (G, k', d_in), B (G, d_out, k'))`` with k' = min(k, R) and
    scale 1, and stats: ``iterations``, output ``rank`` and ``assign`` (the cluster of each unit, (ΣG, R))."""
    grams_a = [torch.bmm(ua, ua.transpose(1, 2)) for ua, _ in groups]
    grams_b = [torch.bmm(ub, ub.transpose(1, 2)) for _, ub in groups]
    Ka, Kb = torch.cat(grams_a), torch.cat(grams_b)
    K = Ka + Kb
    R = K.shape[1]
    assign, iterations = kmeans_gram(K, k, generator, max_iter)
    kk = min(k, R)
    W = averaging(assign, kk, K.dtype)
    if param_reweight:
        norms = K.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # ‖u_i‖
        mean_norm = torch.bmm(_members(assign, kk).to(K.dtype), norms.unsqueeze(2)).squeeze(2)
        mean_norm = mean_norm / _members(assign, kk).sum(2).clamp(min=1)
        c_norm = (W * torch.bmm(W, K)).sum(2).clamp(min=0).sqrt()  # ‖c_j‖ = √(W K Wᵀ)_jj
        alpha = torch.where(c_norm > 0, mean_norm / c_norm.clamp(min=torch.finfo(K.dtype).tiny), 1.0)
        W = W * alpha.unsqueeze(2)
    gamma = torch.ones(K.shape[0], dtype=K.dtype, device=K.device)
    if output_reweight:
        target = (Ka * Kb).sum((1, 2)).clamp(min=0)  # ‖Σ_units b aᵀ‖²
        Ga, Gb = (torch.bmm(torch.bmm(W, X), W.transpose(1, 2)) for X in (Ka, Kb))
        merged = (Ga * Gb).sum((1, 2))
        gamma = torch.where(merged > 0, (target / merged.clamp(min=torch.finfo(K.dtype).tiny)).sqrt(), 1.0)
    out, start = [], 0
    for ua, ub in groups:
        g = slice(start, start + ua.shape[0])
        start += ua.shape[0]
        A = torch.bmm(W[g], ua)
        B = torch.bmm(W[g] * gamma[g].view(-1, 1, 1), ub).transpose(1, 2)
        out.append((A, B))
    return out, {"iterations": iterations, "rank": kk, "assign": assign}


def lego_merge(adapters: Sequence[LoraAdapter], k: int | None = None, seed: int = 0, param_reweight: bool = True,
               output_reweight: bool = True, max_iter: int = 100, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, name: str = "lora_lego") -> LoraAdapter:
    """LoRA-LEGO merge of `adapters` into one LoRA of rank min(k, Σ r_i) per module (k default max r_i).

    Modules are batched by unit count R (one k-means for all of them) and, for the GEMMs, by shape.
    Computed in `dtype` (default: the inputs' dtype, at least float32) on `device` (default: where the
    factors are); output in the inputs' dtype."""
    k = check_rank(k, field="method.k") or max_rank(adapters)
    adapters = sorted(adapters, key=lambda a: a.name)
    out_dtype = next(iter(adapters[0].modules.values())).A.dtype
    dtype = dtype or compute_dtype(out_dtype)
    device = device or next(iter(adapters[0].modules.values())).A.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    modules: dict[str, LoraModule] = {}
    iterations = {}
    for R, entries in unit_groups(adapters, dtype, device).items():
        merged, stats = lego_cluster([units for _, units in entries], k, generator, max_iter, param_reweight,
                                     output_reweight)
        iterations[R] = stats["iterations"]
        for (names, _), (A, B) in zip(entries, merged):
            for i, mod in enumerate(names):
                modules[mod] = LoraModule(A[i].to(out_dtype), B[i].to(out_dtype), 1.0)
    modules = {mod: modules[mod] for mod in adapters[0].modules}
    merged_adapter = LoraAdapter(name, adapters[0].base_model, modules, task_type=adapters[0].task_type)
    merged_adapter.metadata = {"method": "lora_lego", "experts": [a.name for a in adapters], "k": k, "seed": seed,
                               "param_reweight": param_reweight, "output_reweight": output_reweight,
                               "iterations": iterations}
    return merged_adapter


def lego_shrink(adapter: LoraAdapter, k: int, **kwargs) -> LoraAdapter:
    """One LoRA re-assembled from k clusters of its own rank-1 units (rank min(k, r))."""
    kwargs.setdefault("name", f"{adapter.name}-lego{k}")
    return lego_merge([adapter], k, **kwargs)


@register_method("lora_lego")
class LoraLego(Method):
    domains = ("nlp", "vl")

    def check_config(self) -> None:
        check_rank(self.cfg.get("k"), field="method.k")
        max_iter = self.cfg.get("max_iter", 100)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ConfigError(f"method.max_iter={max_iter!r}: must be an integer ≥ 1")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        with Timer() as timer:
            merged = lego_merge(
                list(ctx.pool), self.cfg.get("k"), seed=ctx.seed,
                param_reweight=bool(self.cfg.get("param_reweight", True)),
                output_reweight=bool(self.cfg.get("output_reweight", True)),
                max_iter=int(self.cfg.get("max_iter", 100)), device=getattr(ctx.model, "device", None),
            )
        report = FitReport(seconds=timer.seconds, info={"k": merged.metadata["k"],
                                                        "iterations": merged.metadata["iterations"]})
        with ctx.model.adapter_applied(merged):
            yield Composed(ctx.model, report, "", merged)
