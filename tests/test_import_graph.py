"""The import graph of `sidecar/` between packages has no cycle, and the bottom packages import nothing
above them. Every import counts, those under `if TYPE_CHECKING:` and inside functions included: a
cycle hidden from the interpreter still ties the packages together for a reader and a type checker.

A node is a subpackage (`sidecar.pipeline`) or a top-level module (`sidecar.app`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import sidecar

ROOT = Path(sidecar.__file__).parent

# What each bottom package may import (besides itself): the layering the data plane is built on.
#   policy <- core <- telemetry <- exchange, llm <- transport <- cache, queue <- pipeline <- proxy <- runtime <- app
ALLOWED_BELOW = {
    "sidecar.policy": {"sidecar.grpc_rules"},          # grpc_rules: a leaf of pure gRPC codes and rules
    "sidecar.core": {"sidecar.policy", "sidecar.grpc_rules"},
    "sidecar.telemetry": {"sidecar.policy", "sidecar.core", "sidecar.grpc_rules"},
    "sidecar.exchange": {"sidecar.policy", "sidecar.core", "sidecar.telemetry", "sidecar.grpc_rules"},
}


def _node(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_edges() -> dict[str, dict[str, list[str]]]:
    """node -> imported node -> ["file:line", ...]"""
    edges: dict[str, dict[str, list[str]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_of(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        src = _node(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    targets = [".".join([*base, node.module] if node.module else base)]
                elif node.module:
                    targets = [node.module]
            for target in targets:
                if target.split(".")[0] != "sidecar" or target == "sidecar":
                    continue
                dst = _node(target)
                if dst != src:
                    where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                    edges.setdefault(src, {}).setdefault(dst, []).append(where)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_packages():
    edges = import_edges()
    graph = {src: set(dsts) for src, dsts in edges.items()}
    found = cycles(graph)
    detail = []
    for component in found:
        for src in component:
            for dst in component:
                for where in edges.get(src, {}).get(dst, []):
                    detail.append(f"  {src} -> {dst}  ({where})")
    assert not found, "import cycles between packages:\n" + "\n".join(detail)


def test_bottom_packages_import_nothing_above_them():
    edges = import_edges()
    wrong = [f"  {src} -> {dst}  ({', '.join(where)})"
             for src, allowed in ALLOWED_BELOW.items()
             for dst, where in edges.get(src, {}).items() if dst not in allowed]
    assert not wrong, "a bottom package imports a layer above it:\n" + "\n".join(wrong)


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
