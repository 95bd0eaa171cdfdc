"""B1 (DESIGN §8): the N-expert gated LoRA layer vs the base linear: `python -m bench.perf gated [--quick]`.

Synthetic weights of real shapes: a d×d base linear (d = 4096; bf16 on a GPU, fp32 on CPU), N experts of
rank r = 16, per-token gates (LoRA-Flow-style, the most general case: (1, T, N)), input (1, T, d): batch 1,
T tokens (T = 16 is a decode step's worth of tokens, T ≥ 512 a prefill). Inference (no autograd). Variants:

- ``base``: ``F.linear(x, W)``, the floor every variant pays;
- ``stacked``: `bench.lora.stacked.StackedLoraLinear` with per-token gates, as MoLE / LoRA-Flow run it: base GEMM,
  A_cat GEMM, one broadcast gate multiply, B_cat GEMM accumulating into the base output (``addmm_``);
- ``fused``: `bench.lora.stacked.fused_forward`: ``[W; A_cat]`` as one GEMM, then the gate multiply and the
  in-place B_cat ``addmm_`` (two GEMMs in all; needs a copy of W next to A_cat, so it is a serving layout);
- ``naive``: the first stacked formulation (gate expanded with ``repeat_interleave``, separate delta tensor,
  out-of-place add), kept to show what the rewrite bought;
- ``loop``: the per-expert reference: ``y += g_i ⊙ (x A_iᵀ) B_iᵀ`` for each expert in a Python loop;
- ``arrow``: Arrow's routed layer as the model runs it (`methods.arrow.routed_forward`: the stacked layer plus an
  N × d score GEMM against the prototypes, top-k (k = min(3, N), peft's default) and softmax per token);
  ``arrow_fused``: the prototypes appended to ``[W; A_cat]`` so the scores come out of the same GEMM
  (`fused_routed_forward`, a serving layout); their ratio to ``stacked`` is the routing cost per token;
- ``cat``: CAT's composed LoRA of rank N·r left unmerged, ``W x + B'(A' x)`` (`methods.cat.cat_lora_forward`;
  folded into W it costs exactly ``base``).

Two clocks (see the device tool's METHOD.md): ``*_us`` is the eager wall time of one call between CUDA
events (host launch overhead included: what an eager decode step pays), ``*_gpu_us`` the device time per call
from replays of a CUDA graph of 20 back-to-back calls (kernels and their gaps only: what a busy model forward
or a graph-captured decode step pays). Reported per (N, T): both, each variant's ratio to base on both
clocks, loop ÷ stacked, and the goals: ``overhead_goal`` (T ≥ 512 and N·r ≤ 128: stacked ≤ 1.15 × base on
device time, where the GEMMs dominate; also checked for fused) and ``decode_goal`` (T = 16: loop ÷ stacked
≥ 5 on eager time, where launches dominate). ``base_floor_us``: the base layer's bytes (W, x, y) at the copy bandwidth
measured in the same run, a lower bound on the base time itself.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.nn import functional as F

from bench.lora.adapters import LoraModule
from bench.lora.stacked import StackedLoraLinear, fused_forward
from bench.perf import common
from methods.arrow import fused_routed_forward, fused_routed_weight, routed_forward, top_right_singular_vectors
from methods.cat import cat_lora_forward

OVERHEAD_GOAL = 1.15
DECODE_SPEEDUP_GOAL = 5.0


def naive_forward(layer: StackedLoraLinear, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The stacked layer as first written: repeat_interleave'd gate, separate delta, out-of-place add."""
    h = F.linear(x, layer.A_cat)
    g = gates.to(h.dtype).repeat_interleave(layer.rank, dim=-1)
    return layer.base(x) + F.linear(h * g, layer.B_cat)


def loop_forward(W: torch.Tensor, As: list[torch.Tensor], Bs: list[torch.Tensor], x: torch.Tensor,
                 gates: torch.Tensor) -> torch.Tensor:
    """One expert at a time (what per-adapter LoRA layers do)."""
    y = F.linear(x, W)
    for i, (A, B) in enumerate(zip(As, Bs)):
        y = y + gates[..., i : i + 1] * F.linear(F.linear(x, A), B)
    return y


def build(d: int, n: int, rank: int, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    base = base.to(device, dtype)
    experts = [LoraModule(torch.randn(rank, d, generator=g) / math.sqrt(d), torch.randn(d, rank, generator=g) / rank,
                          2.0) for _ in range(n)]
    layer = StackedLoraLinear(base, [e.to(device, dtype) for e in experts])
    x = torch.randn(1, tokens, d, generator=g).to(device, dtype)
    gates = torch.softmax(torch.randn(1, tokens, n, generator=g), -1).to(device, dtype)
    As = [layer.A[i].contiguous() for i in range(n)]
    Bs = [layer.B[i].contiguous() for i in range(n)]  # scales folded in, as in the stacked layer
    return layer, x, gates, As, Bs


def check(layer, x, gates, As, Bs) -> float:
    """Max relative difference of the fast variants from the loop (sanity, not timed)."""
    ref = loop_forward(layer.base.weight, As, Bs, x, gates).float()
    layer.gates = gates
    outs = [layer(x), fused_forward(x, layer.fused_weight(), layer.B_cat, gates, layer.n_experts, layer.rank),
            naive_forward(layer, x, gates)]
    scale = ref.abs().max().clamp(min=1e-6)
    return max(float((o.float() - ref).abs().max() / scale) for o in outs)


def run(d: int, rank: int, experts: list[int], tokens: list[int], device: torch.device, dtype: torch.dtype,
        warmup: int, repeat: int) -> list[dict]:
    bandwidth = common.copy_bandwidth(device)
    rows = []
    for n in experts:
        for t in tokens:
            layer, x, gates, As, Bs = build(d, n, rank, t, device, dtype)
            layer.gates = gates
            w_cat = layer.fused_weight()
            W = layer.base.weight
            prototypes = top_right_singular_vectors(layer.A, layer.B).to(device, dtype)
            w_route, top_k = fused_routed_weight(layer, prototypes), min(3, n)
            cat_lora = LoraModule(layer.A_cat, layer.B_cat / n, 1.0)  # CAT at uniform weights: rank N·r
            fns = {
                "base": lambda: F.linear(x, W),
                "stacked": lambda: layer(x),
                "fused": lambda: fused_forward(x, w_cat, layer.B_cat, gates, n, rank),
                "naive": lambda: naive_forward(layer, x, gates),
                "loop": lambda: loop_forward(W, As, Bs, x, gates),
                "arrow": lambda: routed_forward(layer, x, prototypes, top_k, 1.0),
                "arrow_fused": lambda: fused_routed_forward(x, w_route, layer.B_cat, n, rank, top_k, 1.0),
                "cat": lambda: cat_lora_forward(x, W, cat_lora),
            }
            with torch.inference_mode():
                err = check(layer, x, gates, As, Bs)
                times = {name: common.time_fn(fn, device, warmup=warmup, repeat=repeat) for name, fn in fns.items()}
                device_times = {name: common.time_graph(fn, device, repeat=repeat)["median_s"] for name, fn in fns.items()} \
                    if device.type == "cuda" else {}
            med = {k: v["median_s"] for k, v in times.items()}
            base_bytes = (W.numel() + 2 * x.numel()) * x.element_size()
            row = {"N": n, "T": t, "N_r": n * rank}
            row.update({f"{k}_us": 1e6 * v for k, v in med.items()})
            row.update({f"{k}_min_us": 1e6 * times[k]["min_s"] for k in ("base", "stacked", "fused")})
            row.update({f"{k}_gpu_us": 1e6 * v for k, v in device_times.items()})
            row["base_floor_us"] = 1e6 * base_bytes / bandwidth
            for k in ("stacked", "fused", "naive", "loop", "arrow", "arrow_fused", "cat"):
                row[f"{k}_x_base"] = med[k] / med["base"]
                if device_times:
                    row[f"{k}_gpu_x_base"] = device_times[k] / device_times["base"]
            row["loop_over_stacked"] = med["loop"] / med["stacked"]
            row["loop_over_fused"] = med["loop"] / med["fused"]
            row["arrow_over_stacked"] = med["arrow"] / med["stacked"]
            row["routing_us_per_token"] = 1e6 * (med["arrow"] - med["stacked"]) / t
            if t >= 512 and n * rank <= 128:
                clock = "_gpu" if device_times else ""
                row["overhead_goal"] = ("pass" if row[f"stacked{clock}_x_base"] <= OVERHEAD_GOAL else "FAIL") + \
                    (" (fused pass)" if row[f"fused{clock}_x_base"] <= OVERHEAD_GOAL else " (fused FAIL)")
            else:
                row["overhead_goal"] = "-"
            row["decode_goal"] = ("pass" if row["loop_over_stacked"] >= DECODE_SPEEDUP_GOAL else "FAIL") if t == 16 else "-"
            row["max_rel_err"] = err
            rows.append(row)
            if device_times:
                print(f"N={n:3d} T={t:5d}  device time: base {row['base_gpu_us']:8.1f} µs  stacked "
                      f"×{row['stacked_gpu_x_base']:.3f}  fused ×{row['fused_gpu_x_base']:.3f}  loop ×{row['loop_gpu_x_base']:.3f}")
            print(f"N={n:3d} T={t:5d}  base {row['base_us']:9.1f} µs  stacked ×{row['stacked_x_base']:.3f}  "
                  f"fused ×{row['fused_x_base']:.3f}  naive ×{row['naive_x_base']:.3f}  loop ×{row['loop_x_base']:.3f}  "
                  f"loop/stacked {row['loop_over_stacked']:.2f}", flush=True)
            del layer, x, gates, As, Bs, w_cat, fns, prototypes, w_route, cat_lora
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.perf gated", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU-sized run: d=1024, N∈{2,8}, T∈{16,512}")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--d", type=int, default=None, help="hidden size (default 4096; 1024 with --quick)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", default=None, help="comma-separated N values (default 2,4,8,16,32)")
    ap.add_argument("--tokens", default=None, help="comma-separated T values (default 16,512,4096)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default on CPU: 1, steadier than 2 on a shared machine; GPU: untouched)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv or [])
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    d = args.d or (1024 if args.quick else 4096)
    experts = [int(v) for v in args.experts.split(",")] if args.experts else ([2, 8] if args.quick else [2, 4, 8, 16, 32])
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else ([16, 512] if args.quick else [16, 512, 4096])
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else (10 if gpu else 3))
    repeat = args.repeat if args.repeat is not None else (25 if args.quick else (50 if gpu else 10))
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    rows = run(d, args.rank, experts, tokens, device, dtype, warmup, repeat)
    meta = {"d": d, "rank": args.rank, "dtype": str(dtype).replace("torch.", ""), "batch": 1, "gates": "per token",
            "quick": bool(args.quick), "warmup": warmup, "repeat": repeat, "threads": torch.get_num_threads(),
            "goals": {"overhead": f"stacked ≤ {OVERHEAD_GOAL}× base at T ≥ 512 with N·r ≤ 128",
                      "decode": f"loop ÷ stacked ≥ {DECODE_SPEEDUP_GOAL} at T = 16"}}
    common.write_results("gated", rows, meta, device)
