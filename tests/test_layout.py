"""The layout's one rule (docs/layout.md): imports flow foundation → lora → models → methods/tasks → experts → run
→ analysis → perf; imports (lazy ones too) form no circle; every module imports in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("foundation", ("bench.config", "bench.errors", "bench.files", "bench.progress", "bench.registry", "bench")),
    ("lora", ("bench.lora",)),
    ("models", ("bench.models",)),
    ("methods/tasks", ("methods", "tasks")),
    ("experts", ("bench.experts",)),
    ("run", ("bench.run", "bench.__main__")),
    ("analysis", ("bench.analysis",)),
    ("perf", ("bench.perf",)),
]


def layer(module: str) -> int:
    """The layer of a project module (the longest matching prefix)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("bench", "methods", "tasks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out.append((name, path))
    return out


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if (ROOT / Path(*f"{node.module}.{a.name}".split("."))).is_dir()
                      or (ROOT / Path(*f"{node.module}.{a.name}".split("."))).with_suffix(".py").is_file()]
    return [(line, m) for line, m in found if m.split(".")[0] in ("bench", "methods", "tasks")]


def test_imports_flow_one_way():
    wrong = []
    for name, path in modules():
        mine = layer(name)
        for line, imported in project_imports(path):
            theirs = layer(imported)
            if theirs is not None and theirs > mine:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {imported} "
                             f"({LAYERS[theirs][0]})")
    assert wrong == []


def test_no_import_circles():
    """The graph of imports between project modules, lazy (function-level) ones included, has no cycle."""
    graph = {name: {m for _, m in project_imports(path)} for name, path in modules()}
    names = set(graph)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            target = dep if dep in names else dep.rsplit(".", 1)[0]
            if target not in names:
                continue
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif not state.get(target):
                visit(target, stack + [target])
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name, [name])
    assert cycles == []


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n, _ in modules() if not n.endswith("__main__")]
    script = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
