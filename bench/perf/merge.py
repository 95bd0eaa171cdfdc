"""B3 (DESIGN §8): static merges of a 7B-shaped LoRA stack, against the device's copy bandwidth.

``python -m bench.perf merge [--device cuda] [--n 2,8,32] [--layers 32] [--rank 16] [--quick]``

Synthetic experts of real shapes: `layers` × {q, k, v, o: d→d; gate, up: d→ffn; down: ffn→d} (7B-like:
d 4096, ffn 11008, 32 layers = 224 modules), rank r, N experts; base weights, factors and compute in one
dtype (bf16 on a GPU, fp32 on CPU; `--dtype`). Operations, each over the whole stack:

- ``fold_linear``: the exact linear merge (the concatenated LoRA, weights 1/N) folded into the base,
  ``W += B_cat @ A_cat`` per module (`fold_loras_`: one GEMM each, no dense ΔW, modules alternating
  between two CUDA streams). Bytes counted: W read and
  written (2·|W|) plus the factors read. Goal: ≥ 60 % of the measured copy bandwidth.
- ``cat``: building that concatenated LoRA (`concat_merge`, small factor copies). Time only.
- ``ties`` (density 0.2), ``dare_linear`` / ``dare_ties`` (density 0.5, seeded), ``magnitude_prune``
  (density 0.2): per module, the experts' dense deltas by one batched GEMM, the merge (`merge_module`, the
  same code the methods run) and ``W += ΔW``. Bytes counted: N·|W| (each expert's dense delta written
  once) + 2·|W| (W read and written), the least traffic any merge that materializes the deltas moves.
  Goal: ≤ 0.5 s at N = 8.
- ``svd``: the exact sum re-factorized to rank r (`svd_merge`: QR of the factors + SVD of the core, in
  float64). Time only, and only for N ≤ 8 (224 small float64 SVDs of size N·r are latency-bound on a GPU
  and would dominate the run's time budget at N = 32).

- ``knots``, ``core_space``, ``tsv``, ``iso_c``, ``iso_cts``, ``wudi``, ``della``, ``breadcrumbs``: the 2024–26
  data-free merges with their YAML defaults, per module from the factors in float64 (`ModuleMergeMethod.merge_one`,
  the code the methods run) and ``W += ΔW``. Time only (N = 32: one timed call).

Dense merges run ``fused`` where Triton runs (`merge_stacked`'s default: everything after the threshold /
the Bernoulli draws as one Triton kernel, `methods.ops.triton_merge.merge_tail`), checked against the eager
ops on one module of each shape first (the error lands in the metadata); at N = 8 the eager ops are timed
too. The TIES / magnitude-prune thresholds come from the Triton radix select where it runs; the metadata
records which selection ran and whether its thresholds equal `torch.topk`'s bit for bit on every module
shape. Without Triton they run the eager ops only (metadata ``fused: off``).

``--stages`` times instead each step of the dense merges on the stack's largest module (d_out × d_in = ffn × d)
at the largest N, next to the alternatives they replaced, with the time each step would take over the whole
stack (× the stack's elements over the module's): where the merge time goes (`results/perf/merge_stages-*`).

Times are medians (and minima) over repeats after warm-up (`common.time_fn`); GB/s = counted bytes /
median time; ratio = GB/s ÷ the copy bandwidth measured in the same run. Goals are GPU goals: on CPU
they are reported as n/a.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from bench.lora.adapters import LoraAdapter, LoraModule
from bench.perf.common import copy_bandwidth, pick_device, time_fn, write_results
from methods.linear import concat_merge
from methods.ops import triton_merge
from methods.ops.merge_ops import (by_name, dare_masks, expert_deltas, fold_loras_, merge_module, merge_stacked, module_generator,
                               stack_factors, topk_kth_largest, trim_thresholds)
from methods.svd import svd_merge

FULL = dict(layers=32, d=4096, ffn=11008, n=[2, 8, 32])
QUICK = dict(layers=2, d=256, ffn=688, n=[2, 8])
DENSE_OPS = {"ties": 0.2, "dare_linear": 0.5, "dare_ties": 0.5, "magnitude_prune": 0.2}  # kind: density
# the 2024–26 data-free merges (methods.ops.merge_ops.ModuleMergeMethod), with their YAML defaults
MODULE_MERGES = ("knots", "core_space", "tsv", "iso_c", "iso_cts", "wudi", "della", "breadcrumbs")
OPS = ["fold_linear", "cat", *DENSE_OPS, "svd", *MODULE_MERGES]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
FOLD_GOAL, MERGE_GOAL_S, MERGE_GOAL_N = 0.60, 0.5, 8
SVD_MAX_N = 8


def stack_shapes(layers: int, d: int, ffn: int) -> dict[str, tuple[int, int]]:
    """Module path -> (d_out, d_in) of a Llama-7B-like stack."""
    shapes = {}
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{i}.self_attn.{p}"] = (d, d)
        shapes[f"model.layers.{i}.mlp.gate_proj"] = (ffn, d)
        shapes[f"model.layers.{i}.mlp.up_proj"] = (ffn, d)
        shapes[f"model.layers.{i}.mlp.down_proj"] = (d, ffn)
    return shapes


def synthetic_pool(n: int, shapes: dict[str, tuple[int, int]], rank: int, dtype: torch.dtype,
                   device: torch.device, seed: int = 0) -> list[LoraAdapter]:
    """`n` random LoRAs (A ~ N(0, 1/d_in), B ~ N(0, 1e-4), alpha = 2r) generated on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    pool = []
    for i in range(n):
        modules = {}
        for name, (d_out, d_in) in shapes.items():
            A = torch.randn(rank, d_in, generator=g, device=device).div_(d_in**0.5).to(dtype)
            B = torch.randn(d_out, rank, generator=g, device=device).mul_(1e-2).to(dtype)
            modules[name] = LoraModule(A, B, 2.0)
        pool.append(LoraAdapter(f"expert{i:02d}", "synthetic-7b", modules))
    return pool


def base_weights(shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Random base weights W (d_out × d_in) for every module."""
    return {name: torch.randn(d_out, d_in, device=device).mul_(0.02).to(dtype)
            for name, (d_out, d_in) in shapes.items()}


def operation(op: str, pool: list[LoraAdapter], weights: dict[str, torch.Tensor], rank: int,
              fused: bool = False) -> Callable[[], None]:
    n = len(pool)
    if op == "fold_linear":
        merged = concat_merge(pool, [1.0 / n] * n)

        folds = [(W, merged.modules[name]) for name, W in weights.items()]

        def run() -> None:
            fold_loras_(folds)
    elif op == "cat":
        def run() -> None:
            concat_merge(pool, [1.0 / n] * n)
    elif op == "svd":
        def run() -> None:
            svd_merge(pool, [1.0 / n] * n, rank)
    elif op in MODULE_MERGES:
        method = module_merge_method(op)
        ordered, w = by_name(pool, [1.0] * n if method.default_weights == "ones" else [1.0 / n] * n)

        def run() -> None:
            for name, W in weights.items():
                W.add_(method.merge_one(ordered, w, name, 0, W.device).to(W.dtype))
    else:
        def run() -> None:
            for name, W in weights.items():
                W.add_(dense_merge(op, pool, name, W, fused))
    return run


def module_merge_method(name: str):
    """The registered merge `name` built from its YAML defaults (conf/method/<name>.yaml)."""
    from omegaconf import OmegaConf

    from bench.config import CONF_DIR
    from bench.registry import get_method

    return get_method(name)(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"))


def dense_merge(op: str, pool: list[LoraAdapter], module: str, W: torch.Tensor, fused: bool) -> torch.Tensor:
    """One module's merged ΔW for a dense op, computed in W's dtype on W's device (the methods' defaults:
    weights 1 for disjoint means, 1/N otherwise; DARE seeded per module)."""
    n = len(pool)
    w = [1.0] * n if op in ("ties", "dare_ties") else [1.0 / n] * n
    gen = module_generator(0, module, W.device) if op.startswith("dare") else None
    return merge_module(pool, w, module, op, DENSE_OPS[op], "total", gen, W.dtype, W.device, fused)


def fused_error(op: str, pool: list[LoraAdapter], weights: dict[str, torch.Tensor]) -> float:
    """Largest |fused − eager| / max |eager| over one module of each shape (compiles the Triton kernels)."""
    firsts = {tuple(W.shape): name for name, W in reversed(list(weights.items()))}
    err = 0.0
    for name in firsts.values():
        eager = dense_merge(op, pool, name, weights[name], False).float()
        fused = dense_merge(op, pool, name, weights[name], True).float()
        err = max(err, ((fused - eager).abs().max() / eager.abs().max().clamp(min=1e-30)).item())
    return err


def counted_bytes(op: str, pool: list[LoraAdapter], weights: dict[str, torch.Tensor]) -> int | None:
    w_bytes = sum(W.numel() * W.element_size() for W in weights.values())
    factor_bytes = sum((m.A.numel() + m.B.numel()) * m.A.element_size() for a in pool for m in a.modules.values())
    if op == "fold_linear":
        return 2 * w_bytes + factor_bytes
    if op in DENSE_OPS:
        return (len(pool) + 2) * w_bytes
    return None


def goal(op: str, n: int, median_s: float, ratio: float | None, gpu: bool) -> tuple[str, str]:
    if op == "fold_linear":
        text, ok = f"ratio ≥ {FOLD_GOAL:.2f}", ratio is not None and ratio >= FOLD_GOAL
    elif op in DENSE_OPS and n == MERGE_GOAL_N:
        text, ok = f"≤ {MERGE_GOAL_S} s at N={MERGE_GOAL_N}", median_s <= MERGE_GOAL_S
    else:
        return "", ""
    return text, ("pass" if ok else "FAIL") if gpu else "n/a (CPU)"


def stack_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark of the 7B-like stack takes (read back by `stack_settings`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--n", default=None, help="comma-separated expert counts (default 2,8,32; quick 2,8)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d", type=int, default=None, help="hidden size (default 4096; quick 256)")
    p.add_argument("--ffn", type=int, default=None, help="MLP size (default 11008; quick 688)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="factors' dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes (the default without a GPU)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = stack_parser("python -m bench.perf merge", __doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                   help="dense merges through the Triton tail (auto: where Triton runs); eager rows at N=8 for comparison")
    p.add_argument("--stages", action="store_true", help="time each step of the dense merges on the largest module")
    return p.parse_args(argv)


def stack_settings(args: argparse.Namespace) -> tuple:
    """(device, on_gpu, layers, d, ffn, expert counts, dtype): the full 7B-like stack on a GPU, the quick one
    otherwise or with --quick; explicit arguments win."""
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    preset = QUICK if args.quick or not gpu else FULL
    layers, d, ffn = args.layers or preset["layers"], args.d or preset["d"], args.ffn or preset["ffn"]
    ns = [int(x) for x in args.n.split(",")] if args.n else preset["n"]
    return device, gpu, layers, d, ffn, ns, DTYPES[args.dtype or ("bf16" if gpu else "fp32")]


def topk_thresholds(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """The per-expert k-th largest magnitude by `torch.topk` (`merge_ops.topk_kth_largest`)."""
    a = stacked.abs().reshape(stacked.shape[0], -1)
    return topk_kth_largest(a, int(density * a.shape[1]))


def threshold_check(pool: list[LoraAdapter], weights: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Which selection `trim_thresholds` uses here, and whether its thresholds equal topk's, bit for bit,
    on each module shape at densities 0.2 and 0.5."""
    same = True
    for module in {tuple(w.shape): name for name, w in weights.items()}.values():
        A, B = stack_factors(pool, module, weights[module].dtype, device)
        stacked = expert_deltas(A, B)
        for density in (0.2, 0.5):
            same &= torch.equal(trim_thresholds(stacked, density).flatten(), topk_thresholds(stacked, density))
    rows = stacked.reshape(stacked.shape[0], -1)
    return {"threshold": "radix select (Triton)" if triton_merge.available(rows) else "torch.topk",
            "threshold_equals_topk": bool(same)}


def stage_rows(pool: list[LoraAdapter], weights: dict[str, torch.Tensor], device: torch.device) -> list[dict]:
    """Each step of the dense merges on the largest module, timed alone (see the module docstring)."""
    module = max(weights, key=lambda name: weights[name].numel())
    W = weights[module]
    scale = sum(w.numel() for w in weights.values()) / W.numel()
    n = len(pool)
    A, B = stack_factors(pool, module, W.dtype, device)
    stacked = expert_deltas(A, B)
    tau = trim_thresholds(stacked, 0.2)
    mask = dare_masks(stacked, 0.5, module_generator(0, module, device))
    ones = torch.ones(n, dtype=torch.float64, device=device)
    rows2d, tau2d = stacked.reshape(n, -1), tau.reshape(n)
    steps = {
        "stack factors": lambda: stack_factors(pool, module, W.dtype, device),
        "deltas (bmm)": lambda: expert_deltas(A, B),
        "threshold (merge_ops.trim_thresholds)": lambda: trim_thresholds(stacked, 0.2),
        "threshold: torch.topk (before)": lambda: topk_thresholds(stacked, 0.2),
        "dare masks: bool": lambda: dare_masks(stacked, 0.5, module_generator(0, module, device)),
    }
    if triton_merge.available(stacked):
        steps.update({
            "tail: ties (Triton)": lambda: triton_merge.merge_tail(rows2d, ones, tau2d, None, True, True),
            "tail: dare_linear (Triton)": lambda: triton_merge.merge_tail(rows2d, ones / n, None, mask, False, True),
            "tail: dare_ties (Triton)": lambda: triton_merge.merge_tail(rows2d, ones, None, mask, True, True),
        })
    steps.update({
        "ties from the deltas, eager ops (clone + threshold + tail)":
            lambda: merge_stacked(stacked.clone(), ones, "ties", 0.2, fused=False),
        "W += dW": lambda: W.add_(stacked[0]),
        "copy of the deltas (reference)": lambda: stacked.clone(),
    })
    rows = []
    for name, fn in steps.items():
        t = time_fn(fn, device, warmup=2, repeat=5)
        rows.append({"step": name, "module": f"{tuple(W.shape)} × N={n}", "median_ms": 1e3 * t["median_s"],
                     "whole_stack_s": t["median_s"] * scale})
        print(f"{name:32s} {1e3 * t['median_s']:9.2f} ms   whole stack ≈ {t['median_s'] * scale:7.3f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device, gpu, layers, d, ffn, ns, dtype = stack_settings(args)
    if args.stages:
        shapes = stack_shapes(layers, d, ffn)
        weights = base_weights(shapes, dtype, device)
        rows = stage_rows(synthetic_pool(max(ns), shapes, args.rank, dtype, device), weights, device)
        write_results("merge_stages", rows, {"layers": layers, "d": d, "ffn": ffn, "rank": args.rank,
                                             "dtype": str(dtype).removeprefix("torch."), "n": max(ns)}, device)
        return
    ops = [o for o in args.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    shapes = stack_shapes(layers, d, ffn)
    copy_bps = copy_bandwidth(device)
    weights = base_weights(shapes, dtype, device)
    fused = args.fused == "on" or (args.fused == "auto" and triton_merge.available(next(iter(weights.values()))))
    rows, fused_errors, fused_note, thresholds = [], {}, "off", {}
    for n in ns:
        pool = synthetic_pool(n, shapes, args.rank, dtype, device, seed=n)
        if not thresholds and any(op in ("ties", "magnitude_prune") for op in ops):
            thresholds = threshold_check(pool, weights, device)
            print(f"thresholds: {thresholds}", flush=True)
        if fused and not fused_errors:  # compile and check against the eager ops once, on the device
            fused_errors = {op: fused_error(op, pool, weights) for op in ops if op in DENSE_OPS}
            fused_note = "on (Triton: methods.ops.triton_merge.merge_tail)"
            print(f"fused: {fused_note}; max rel. error vs eager {fused_errors}", flush=True)
        for op in ops:
            if op == "svd" and n > SVD_MAX_N:
                continue
            impls = [False]
            if op in DENSE_OPS and fused:
                impls = [True, False] if n == MERGE_GOAL_N else [True]
            for impl in impls:
                slow = op not in ("fold_linear", "cat")
                warmup, repeat = (1, (2 if n >= 32 else 5)) if slow else (3, 10)
                if op in MODULE_MERGES:  # float64 work over the whole stack: seconds to a minute a call
                    warmup, repeat = (0, 1) if n >= 32 else (1, 2)
                t = time_fn(operation(op, pool, weights, args.rank, impl), device, warmup=warmup, repeat=repeat)
                nbytes = counted_bytes(op, pool, weights)
                gbps = nbytes / t["median_s"] / 1e9 if nbytes else None
                ratio = gbps * 1e9 / copy_bps if gbps else None
                goal_text, verdict = goal(op, n, t["median_s"], ratio, gpu)
                label = ("fused" if impl else "eager") if op in DENSE_OPS else ""
                rows.append({"op": op, "impl": label, "n": n, "median_s": t["median_s"], "min_s": t["min_s"],
                             "counted_GB": nbytes / 1e9 if nbytes else None, "GBps": gbps,
                             "copy_GBps": copy_bps / 1e9, "ratio": ratio, "goal": goal_text, "result": verdict})
                print(f"{op:16s} {label:5s} N={n:<3d} median {t['median_s'] * 1e3:9.2f} ms  "
                      + (f"{gbps:8.1f} GB/s  ratio {ratio:.2f}" if gbps else ""), flush=True)
        del pool
        if gpu:
            torch.cuda.empty_cache()
    meta = {"layers": layers, "d": d, "ffn": ffn, "modules": len(shapes), "rank": args.rank,
            "dtype": str(dtype).removeprefix("torch."), "densities": DENSE_OPS, "fused": fused_note,
            "fused_max_rel_error_vs_eager": fused_errors, **thresholds,
            "bytes_counted": {"fold_linear": "2·|W| (W read + written) + factors read",
                              "dense merges": "(N + 2)·|W|: N dense deltas written once + W read and written",
                              "cat, svd": "not counted (time only)"},
            "goals": {"fold_linear": f"≥ {FOLD_GOAL:.0%} of copy bandwidth",
                      "ties/dare/magnitude_prune": f"≤ {MERGE_GOAL_S} s at N={MERGE_GOAL_N} (GPU)"}}
    write_results("merge", rows, meta, device)


if __name__ == "__main__":
    main()
