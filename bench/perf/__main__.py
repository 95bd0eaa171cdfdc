"""`python -m bench.perf <benchmark> [args]`; `python -m bench.perf all` runs every benchmark in turn.

Without a CUDA device (and without ``--device``), the benchmarks run their ``--quick`` CPU sizes unless ``--full``
is given."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench.perf as perf_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(perf_pkg.__path__) if m.name not in ("common",) and not m.name.startswith("_"))


def _has_gpu(args: list[str]) -> bool:
    """A CUDA device is present, or the arguments name a device (the benchmark then runs where it is told)."""
    import torch

    return torch.cuda.is_available() or "--device" in args


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench.perf {{{','.join(names + ['all'])}}} [options]")
        return
    name, rest = argv[0], argv[1:]
    if "--full" in rest:
        rest = [a for a in rest if a != "--full"]
    elif "--quick" not in rest and not _has_gpu(rest):
        print("bench.perf: no CUDA device, so the quick (CPU) sizes run; --full runs the GPU sizes here", flush=True)
        rest = [*rest, "--quick"]
    if name == "all":
        for each in names:
            importlib.import_module(f"bench.perf.{each}").main(rest)
        return
    if name not in names:
        sys.exit(f"unknown benchmark {name!r}; choose one of {names + ['all']}")
    importlib.import_module(f"bench.perf.{name}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
