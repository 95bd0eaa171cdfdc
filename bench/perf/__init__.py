"""Performance benchmarks (DESIGN §8): `python -m bench.perf <name> [options]`.

Importable with torch (and peft) alone, so it runs on a bare GPU machine: no hydra here. Each benchmark
module defines `main(argv) -> None` and writes its numbers with `common.write_results`.

May import anything in the project (the last layer, docs/layout.md).
"""
