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

Unit order. k-means++ seeding draws unit *indices*, so with units in input order a permutation of the ranks
inside one LoRA (which leaves its ΔW unchanged) would change which units seed the centres. The clustering
objective (the within-cluster sum of squares over the *set* of units) does not depend on order, so neither
does our result: each module's units are put in a canonical order first (by their projection on a fixed
pseudo-random direction; two units with equal keys are, almost surely, equal units, whose order is
immaterial). With it, and experts in name order, the merge depends on the set of units and the seed only.

Reconstruction and dual reweighting (the paper's "dual reweighting": parameter reweighting against the *norm
decay* of averaged units, output reweighting against the *variance expansion* of a rank-k output). The
paper's text was not readable offline here, so its equation numbers are not cited; the formulas below are the
ones both public reimplementations we could read use (a `LoRA_LEGO` merge beside KnOTS / TSV-M / Iso-C, and
a port of an `src/lego/merger.py`), and each matches the paper's stated purpose:

1. ``param_reweight``: each centroid, as one vector ``c_j = [a_j, b_j]`` (length d_in + d_out, the mean of its
   member units), is rescaled to the mean norm of its members, ``c_j ← c_j · mean_{u∈C_j} ‖u‖ / ‖c_j‖``, in
   the max-abs norm ``‖·‖_∞`` (``param_norm: inf``, as both reimplementations do) or the Euclidean norm
   (``param_norm: 2``). A mean of non-parallel vectors is shorter than they are; this undoes that and only
   ever grows a centroid (``‖c_j‖ ≤ mean ‖u‖`` by the triangle inequality, in any norm).
2. ``output_reweight``: the merged update is multiplied by ``√(r / k')``, r the rank of the input LoRAs (their
   mean rank ``R / N`` when ranks differ) and k' = min(k, R) the merged rank: a LoRA's output is a sum of its
   rank-1 units' outputs, whose variance grows linearly with the number of units, so a rank-k' merge of
   rank-r units is brought back to the output variance of a rank-r LoRA. It shrinks whenever k' > r and is 1
   at k' = r (the default k = max r_i with equal ranks).

The merged LoRA has rank k' (``A[j] = α_j a_j``, ``B[:, j] = α_j √(r/k') b_j``, scale 1). Earlier versions of
this module rescaled the merge to the Frobenius norm of the *sum* of all N experts (a factor ≈ 3–4.5 on the
local pools), which inflates rather than corrects; it is gone.

Inputs may have different ranks; one LoRA with k < r is shrunk to rank k (`lego_shrink`). Seeded: the same seed
on the same device gives the same clusters.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch

from bench.errors import ConfigError
from bench.lora.adapters import LoraAdapter, LoraModule
from bench.registry import register_method
from methods.base import Composed, FitContext, FitReport, Method, Timer
from methods.ops.merge_ops import check_rank, compute_dtype, max_rank

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


PARAM_NORMS = ("inf", "2")


def canonical_order(ua: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
    """``(G, R)`` permutation putting each module's units in an order that depends on their values only: by the
    projection of ``[a, b]`` on a fixed pseudo-random direction (the same for every call)."""
    g = torch.Generator().manual_seed(0x1E60)
    va = torch.randn(ua.shape[-1], generator=g, dtype=torch.float64).to(ua.device, ua.dtype)
    vb = torch.randn(ub.shape[-1], generator=g, dtype=torch.float64).to(ub.device, ub.dtype)
    key = (ua * va).sum(-1) + (ub * vb).sum(-1)
    return key.argsort(dim=1, stable=True)


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
                 param_reweight: bool = True, output_reweight: bool = True, n_loras: int = 1,
                 param_norm: str = "inf") -> tuple[list[Units], dict]:
    """Cluster the units of every module in `groups` (all with the same R, from `n_loras` LoRAs) in one batched
    k-means over the units in canonical order, then reconstruct and reweight (module docstring).

    Returns per group the merged factors ``(A (G, k', d_in), B (G, d_out, k'))`` with k' = min(k, R) and
    scale 1, and stats: ``iterations``, output ``rank``, ``output_factor`` (√(r/k')) and ``assign`` (the
    cluster of each unit in input order, (ΣG, R))."""
    if param_norm not in PARAM_NORMS:
        raise ConfigError(f"method.param_norm={param_norm!r}; choose one of {PARAM_NORMS}")
    orders = [canonical_order(ua, ub) for ua, ub in groups]
    groups = [(ua.gather(1, o.unsqueeze(2).expand_as(ua)), ub.gather(1, o.unsqueeze(2).expand_as(ub)))
              for (ua, ub), o in zip(groups, orders)]
    K = torch.cat([torch.bmm(ua, ua.transpose(1, 2)) + torch.bmm(ub, ub.transpose(1, 2)) for ua, ub in groups])
    R = K.shape[1]
    assign, iterations = kmeans_gram(K, k, generator, max_iter)
    kk = min(k, R)
    members = _members(assign, kk).to(K.dtype)  # (ΣG, k, R)
    W = averaging(assign, kk, K.dtype)
    factor = (R / n_loras / kk) ** 0.5 if output_reweight else 1.0
    out, start = [], 0
    for ua, ub in groups:
        g = slice(start, start + ua.shape[0])
        start += ua.shape[0]
        A, Bt = torch.bmm(W[g], ua), torch.bmm(W[g], ub)  # centroids (G, k', d_in), (G, k', d_out)
        if param_reweight:
            ord_ = float("inf") if param_norm == "inf" else 2.0
            unit_norm = torch.cat([ua, ub], 2).norm(p=ord_, dim=2)  # (G, R)
            target = torch.bmm(members[g], unit_norm.unsqueeze(2)).squeeze(2) / members[g].sum(2).clamp(min=1)
            c_norm = torch.cat([A, Bt], 2).norm(p=ord_, dim=2)
            alpha = torch.where(c_norm > 0, target / c_norm.clamp(min=torch.finfo(K.dtype).tiny), 1.0)
            A, Bt = A * alpha.unsqueeze(2), Bt * alpha.unsqueeze(2)
        out.append((A, (Bt * factor).transpose(1, 2)))
    inverse = torch.cat([o.argsort(dim=1) for o in orders])
    return out, {"iterations": iterations, "rank": kk, "output_factor": factor, "assign": assign.gather(1, inverse)}


def lego_merge(adapters: Sequence[LoraAdapter], k: int | None = None, seed: int = 0, param_reweight: bool = True,
               output_reweight: bool = True, max_iter: int = 100, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, name: str = "lora_lego",
               param_norm: str = "inf") -> LoraAdapter:
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
                                     output_reweight, n_loras=len(adapters), param_norm=param_norm)
        iterations[R] = stats["iterations"]
        for (names, _), (A, B) in zip(entries, merged):
            for i, mod in enumerate(names):
                modules[mod] = LoraModule(A[i].to(out_dtype), B[i].to(out_dtype), 1.0)
    modules = {mod: modules[mod] for mod in adapters[0].modules}
    merged_adapter = LoraAdapter(name, adapters[0].base_model, modules, task_type=adapters[0].task_type)
    merged_adapter.metadata = {"method": "lora_lego", "experts": [a.name for a in adapters], "k": k, "seed": seed,
                               "param_reweight": param_reweight, "param_norm": param_norm,
                               "output_reweight": output_reweight, "iterations": iterations}
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
        if str(self.cfg.get("param_norm", "inf")) not in PARAM_NORMS:
            raise ConfigError(f"method.param_norm={self.cfg.param_norm!r}; choose one of {PARAM_NORMS}")

    def compose(self, ctx: FitContext) -> Iterator[Composed]:
        with Timer() as timer:
            merged = lego_merge(
                list(ctx.pool), self.cfg.get("k"), seed=ctx.seed,
                param_reweight=bool(self.cfg.get("param_reweight", True)),
                output_reweight=bool(self.cfg.get("output_reweight", True)),
                param_norm=str(self.cfg.get("param_norm", "inf")), max_iter=int(self.cfg.get("max_iter", 100)), device=getattr(ctx.model, "device", None),
            )
        report = FitReport(seconds=timer.seconds, info={"k": merged.metadata["k"],
                                                        "iterations": merged.metadata["iterations"]})
        with ctx.model.adapter_applied(merged):
            yield Composed(ctx.model, report, "", merged)
