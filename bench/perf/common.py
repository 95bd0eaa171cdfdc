"""Timing and reporting helpers shared by the benchmarks (see the device tool's METHOD.md).

Times are medians over repeats after warm-up, measured with CUDA events on a GPU (host clock after a
synchronize on CPU). `copy_bandwidth` measures the device's copy ceiling in the same run, so merge
throughput is reported as a fraction of it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.run.records import hardware

# Your runs land in results/local/perf; the committed numbers (results/perf) are refreshed on purpose with
# BENCH_PERF_DIR=results/perf (as the device runs behind docs/performance.md do).
RESULTS_DIR = Path(os.environ.get("BENCH_PERF_DIR", Path(__file__).resolve().parents[2] / "results" / "local" / "perf"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 10) -> dict:
    """Median, min and all times (seconds) of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def time_graph(fn: Callable[[], object], device: torch.device, calls: int = 20, warmup: int = 3,
               repeat: int = 20) -> dict:
    """Per-call device time of `fn` from replays of a CUDA graph holding `calls` back-to-back calls: the
    GPU time of its kernels and their gaps, without host launch overhead (what a model forward that keeps
    the GPU busy, or a graph-captured decode step, pays). Same keys as `time_fn`."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up off the default stream, as graph capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    t = time_fn(graph.replay, device, warmup=warmup, repeat=repeat)
    return {k: ([v / calls for v in t[k]] if isinstance(t[k], list) else t[k] / calls) for k in t}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type == "cpu":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, repeat=10)["median_s"]
    return 2 * src.numel() * src.element_size() / t


def environment(device: torch.device) -> dict:
    return {"device": hardware(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def write_results(name: str, rows: list[dict], meta: dict, device: torch.device) -> Path:
    """Write `results/perf/<name>-<cpu|gpu>.json` and a Markdown table beside it; print the table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if device.type == "cuda" else "cpu"
    payload = {"benchmark": name, **environment(device), **meta, "rows": rows}
    path = RESULTS_DIR / f"{name}-{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)
    table = markdown_table(rows)
    md = RESULTS_DIR / f"{name}-{tag}.md"
    md.write_text(f"# {name} on {payload['device']}\n\n{json.dumps(meta, default=str)}\n\n{table}\n")
    print(f"\n## {name} on {payload['device']}\n{table}")
    return path


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(c for r in rows for c in r if not isinstance(r[c], list)))  # every row's, in order
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
