"""`python -m bench.perf <benchmark> [args]`; `python -m bench.perf all` runs every benchmark in turn."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench.perf as perf_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(perf_pkg.__path__) if m.name not in ("common",) and not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench.perf {{{','.join(names + ['all'])}}} [options]")
        return
    name, rest = argv[0], argv[1:]
    if name == "all":
        for each in names:
            importlib.import_module(f"bench.perf.{each}").main(rest)
        return
    if name not in names:
        sys.exit(f"unknown benchmark {name!r}; choose one of {names + ['all']}")
    importlib.import_module(f"bench.perf.{name}").main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
