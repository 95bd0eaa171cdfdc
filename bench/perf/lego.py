"""B6 (DESIGN §8): LoRA-LEGO clustering of a 7B-shaped LoRA pool.

``python -m bench.perf lego [--device cuda] [--n 2,8,32] [--layers 32] [--rank 16] [--quick]``

The same synthetic experts as `bench.perf.merge` (32 layers × q,k,v,o,gate,up,down, r 16; factors in bf16
on a GPU, fp32 on CPU); clustering in float32. Timed, each for the whole stack (224 modules):

- ``cluster``: `lego_cluster` on the units already stacked per shape (Gram matrices by one batched GEMM
  per shape, k-means++ and Lloyd's iterations as one batched op over all modules, centroids, dual
  reweighting). Goal: < 50 ms on GPU. GB/s counts the fp32 units read twice (Gram + centroids).
- ``merge``: `lego_merge` end to end from the adapters (units gathered and stacked, clustering, the merged
  LoraAdapter assembled). Time only.

k = r (the default: max r_i). Times are medians (and minima) after warm-up; the iterations column is
Lloyd's iterations of the timed run's k-means (it stops when the assignment is stable, ≤ max_iter).
"""

from __future__ import annotations

import argparse

import torch

from bench.perf.common import copy_bandwidth, time_fn, write_results
from bench.perf.merge import stack_parser, stack_settings, stack_shapes, synthetic_pool
from methods.lora_lego import lego_cluster, lego_merge, unit_groups

GOAL_S = 0.050


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = stack_parser("python -m bench.perf lego", __doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=None, help="clusters (default: the rank)")
    p.add_argument("--max-iter", type=int, default=100)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device, gpu, layers, d, ffn, ns, dtype = stack_settings(args)
    k = args.k or args.rank
    shapes = stack_shapes(layers, d, ffn)
    copy_bps = copy_bandwidth(device)
    rows = []
    for n in ns:
        pool = synthetic_pool(n, shapes, args.rank, dtype, device, seed=n)
        (R, entries), = unit_groups(pool, torch.float32, device).items()
        groups = [units for _, units in entries]
        stats = {}

        def cluster() -> None:
            stats.update(lego_cluster(groups, k, torch.Generator(device=device).manual_seed(0), args.max_iter)[1])

        def merge() -> None:
            lego_merge(pool, k, seed=0, max_iter=args.max_iter, device=device)

        unit_bytes = sum(ua.numel() * 4 + ub.numel() * 4 for ua, ub in groups)
        for op, fn in (("cluster", cluster), ("merge", merge)):
            t = time_fn(fn, device, warmup=2, repeat=10 if op == "cluster" else 3)
            gbps = 2 * unit_bytes / t["median_s"] / 1e9 if op == "cluster" else None
            ok = t["median_s"] < GOAL_S
            rows.append({"op": op, "n": n, "units_R": R, "k": k, "median_s": t["median_s"], "min_s": t["min_s"],
                         "iterations": stats["iterations"] if op == "cluster" else None, "GBps": gbps,
                         "ratio": gbps * 1e9 / copy_bps if gbps else None,
                         "goal": f"< {GOAL_S * 1e3:.0f} ms" if op == "cluster" else "",
                         "result": ("pass" if ok else "FAIL") if gpu and op == "cluster" else
                                   ("n/a (CPU)" if op == "cluster" else "")})
            print(f"{op:8s} N={n:<3d} R={R:<4d} median {t['median_s'] * 1e3:9.2f} ms", flush=True)
        del pool, groups, entries
        if gpu:
            torch.cuda.empty_cache()
    meta = {"layers": layers, "d": d, "ffn": ffn, "modules": len(shapes), "rank": args.rank, "k": k,
            "max_iter": args.max_iter, "factors_dtype": str(dtype).removeprefix("torch."), "cluster_dtype": "float32",
            "copy_GBps": copy_bps / 1e9, "goal": f"cluster < {GOAL_S * 1e3:.0f} ms on GPU (whole stack)",
            "bytes_counted": "cluster: the float32 units read twice (Gram + centroids)"}
    write_results("lego", rows, meta, device)


if __name__ == "__main__":
    main()
