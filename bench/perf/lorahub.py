"""B4: a LoraHub search with in-place candidates vs rebuilding the adapter per candidate (DESIGN §8).

Goal: the 40-candidate search ≥ 10× faster than the rebuild-the-state-dict baseline.

The model is synthetic with real shapes: ``--blocks`` residual blocks of width ``--d``, each with two
LoRA-targeted projections ``q`` and ``v`` plus an untargeted output projection and FFN, and an LM head. The
default is flan-t5-large-like (LoraHub's base): 48 blocks (its 24 encoder + 24 decoder blocks) of d=1024,
FFN 2816, vocabulary 32128, so 96 LoRA modules of 1024×1024 (the real LoRAs have 144: the decoder's
cross-attention q, v too) and ≈ 0.45 B parameters, about the per-token cost of the real model's forward;
the objective is the cross-entropy of fixed random labels on a fixed batch (``--batch`` examples ×
``--seq`` tokens, as LoraHub's K=5 fit examples). N=20 random experts of rank 16. Three ways to evaluate a candidate w (same forward pass each):

  inplace     ours (methods.lorahub.factor_layers): the targeted layers are wrapped once; a candidate is two
              GEMMs that write ``A' = Σ w_i A_i`` and ``B' = Σ w_i B_i`` of all modules into the layers' buffers
  peft_sd     the official code's way: a persistent peft model; per candidate a merged state dict is built in
              Python (Σ over experts and keys) and loaded with ``set_peft_model_state_dict``
  rebuild     the naive baseline: per candidate the merged state dict is built and loaded into a fresh peft
              model (``get_peft_model`` on the base, then ``unload``)

Each path runs the whole search (nevergrad NGOpt, budget 40, as LoraHub; a seeded random search when nevergrad
is missing); we report the median search time over repeats, the per-candidate median, the floor (40 forward
passes with nothing recomposed) and the ratios. ``--quick``: small shapes for the CPU.

Needs torch, peft (and nevergrad, optional); no transformers model download, no hydra.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.perf.common import pick_device, sync, time_fn, write_results

FULL = dict(d=1024, ffn=2816, blocks=48, vocab=32128, batch=5, seq=128, n=20, rank=16, budget=40, repeat=5)
QUICK = dict(d=256, ffn=704, blocks=4, vocab=2048, batch=5, seq=32, n=20, rank=16, budget=40, repeat=3)
PATHS = ("inplace", "peft_sd", "rebuild")


class Block(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.q, self.v, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.wi, self.wo = nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.o(self.q(h) * torch.sigmoid(self.v(h)))
        return x + self.wo(F.gelu(self.wi(self.norm2(x))))


class Stack(nn.Module):
    """Residual blocks with LoRA targets ``blocks.<i>.q`` / ``blocks.<i>.v`` and an LM head."""

    def __init__(self, d: int, ffn: int, blocks: int, vocab: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, ffn) for _ in range(blocks))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def random_pool(model: nn.Module, n: int, rank: int, alpha: float, seed: int = 0):
    from bench.lora.adapters import LoraAdapter, LoraModule
    from bench.lora.pool import ExpertPool

    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i in range(n):
        modules = {}
        for path, layer in model.named_modules():
            if isinstance(layer, nn.Linear) and path.rsplit(".", 1)[-1] in ("q", "v"):
                A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
                B = torch.randn(layer.out_features, rank, generator=g) * 0.02
                modules[path] = LoraModule(A, B, alpha / rank)
        adapters.append(LoraAdapter(f"e{i}", "perf-stack", modules, task_type=None))
    return ExpertPool("perf-stack", adapters)


def candidates_search(objective, n: int, budget: int, seed: int) -> tuple[list[float], str]:
    """LoraHub's search loop (NGOpt, bounds ±1.5, init 0) around `objective(w) -> float`."""
    try:
        import nevergrad as ng
    except ImportError:
        rng = np.random.RandomState(seed)
        return [objective(rng.uniform(-1.5, 1.5, n)) for _ in range(budget)], "random (nevergrad missing)"
    import warnings

    param = ng.p.Array(init=np.zeros(n), lower=-1.5, upper=1.5)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(budget):
            cand = opt.ask()
            values.append(objective(cand.value))
            opt.tell(cand, values[-1])
        opt.provide_recommendation()
    return values, "NGOpt"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.perf lorahub", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({QUICK[key]} with --quick)")
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    shape.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from methods.lorahub import factor_layers

    torch.manual_seed(0)
    model = Stack(shape["d"], shape["ffn"], shape["blocks"], shape["vocab"]).to(device, dtype).eval()
    model.requires_grad_(False)
    n, rank, budget = shape["n"], shape["rank"], shape["budget"]
    pool = random_pool(model, n, rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape["batch"], shape["seq"], shape["d"], generator=g).to(device, dtype)
    labels = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)

    @torch.no_grad()
    def loss() -> float:
        logits = model(x)
        return float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten()))

    config = dict(r=rank, lora_alpha=2.0 * rank, target_modules=["q", "v"], lora_dropout=0.0)
    cache = [{k: v.to(device, dtype) for k, v in a.peft_state_dict().items()} for a in pool]  # like the official cache
    keys = list(cache[0])

    def merged_state_dict(w) -> dict:  # the official get_score's composition, Python loop over experts and keys
        final = {}
        for i, sd in enumerate(cache):
            for key in keys:
                final[key] = w[i] * sd[key] if i == 0 else final[key] + w[i] * sd[key]
        return final

    def search_time(objective) -> dict:
        return time_fn(lambda: candidates_search(objective, n, budget, 0), device, 1, shape["repeat"])

    results: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    probe = np.linspace(-1.0, 1.2, n)

    # ---- inplace (ours)
    with factor_layers(model, pool) as bank:
        def inplace(w) -> float:
            bank.set_weights(torch.as_tensor(np.asarray(w), dtype=torch.float32).to(dtype))
            return loss()

        values["inplace"] = [inplace(probe)]
        results["inplace"] = {"search": search_time(inplace),
                              "candidate": time_fn(lambda: inplace(probe), device, 3, 10)}

    # ---- the official way: persistent peft model, state dict rebuilt and loaded per candidate
    peft_model = get_peft_model(model, LoraConfig(**config))
    peft_model.eval()

    def peft_sd(w) -> float:
        set_peft_model_state_dict(peft_model, merged_state_dict([float(v) for v in w]))
        return loss()

    values["peft_sd"] = [peft_sd(probe)]
    results["peft_sd"] = {"search": search_time(peft_sd),
                          "candidate": time_fn(lambda: peft_sd(probe), device, 3, 10)}
    model = peft_model.unload()

    # ---- the naive baseline: a fresh peft model per candidate
    def rebuild(w) -> float:
        nonlocal model
        fresh = get_peft_model(model, LoraConfig(**config))
        set_peft_model_state_dict(fresh, merged_state_dict([float(v) for v in w]))
        fresh.eval()
        value = loss()
        model = fresh.unload()
        return value

    values["rebuild"] = [rebuild(probe)]
    results["rebuild"] = {"search": search_time(rebuild),
                          "candidate": time_fn(lambda: rebuild(probe), device, 2, 5)}

    floor = time_fn(loss, device, 3, 10)["median_s"]
    _, optimizer = candidates_search(lambda w: 0.0, n, 2, 0)
    t0 = time.perf_counter()
    candidates_search(lambda w: float(np.square(w).sum()), n, budget, 0)
    sync(device)
    optimizer_s = time.perf_counter() - t0

    base = results["inplace"]["search"]["median_s"]
    rows = []
    for path in PATHS:
        r = results[path]
        rows.append({
            "path": path,
            "search_median_s": r["search"]["median_s"],
            "search_min_s": r["search"]["min_s"],
            "candidate_median_ms": 1e3 * r["candidate"]["median_s"],
            "x_inplace": r["search"]["median_s"] / base,
            "objective_at_probe": values[path][0],
        })
    ratio = results["rebuild"]["search"]["median_s"] / base
    spread = max(abs(v[0] - values["inplace"][0]) for v in values.values())
    meta = {
        "shape": shape, "dtype": args.dtype, "modules": len(pool.module_names), "optimizer": optimizer,
        "floor_search_s": budget * floor, "floor_forward_ms": 1e3 * floor, "optimizer_overhead_s": optimizer_s,
        "speedup_vs_rebuild": ratio, "speedup_vs_peft_sd": results["peft_sd"]["search"]["median_s"] / base,
        "goal": "inplace search >= 10x faster than rebuild", "goal_met": bool(ratio >= 10),
        "objective_agreement_abs": spread, "quick": bool(args.quick),
    }
    write_results("lorahub", rows, meta, device)
    print(f"speedup vs rebuild: {ratio:.1f}x (goal ≥ 10x: {'met' if ratio >= 10 else 'NOT met'}); "
          f"vs the official peft state-dict loading: {meta['speedup_vs_peft_sd']:.1f}x; "
          f"floor (40 forwards) {meta['floor_search_s']:.3f}s; optimizer overhead {optimizer_s:.3f}s; "
          f"objectives agree within {spread:.2e}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
