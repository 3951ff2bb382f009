"""The shape of the source tree: the API package stays pure, no import circles, small modules.

These read the source (ast) or import in a fresh interpreter; nothing here runs the code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (ROOT / "operator", ROOT / "trainer")
MAX_LINES = 500

PURITY = """
import importlib, pkgutil, sys
import vlm_api
for m in pkgutil.walk_packages(vlm_api.__path__, "vlm_api."):
    importlib.import_module(m.name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchx", "vlm_operator", "vlm_trainer",
                                                          "vlm_local", "kopf", "kubernetes"))
print(" ".join(bad))
"""


def test_vlm_api_imports_neither_torch_nor_torchx_nor_the_operator():
    """Both images need vlm_api (the operator's has no torch, the trainer's no kopf), and
    `vlmpretrain validate/render` must start without them."""
    r = subprocess.run([sys.executable, "-c", PURITY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], f"importing every vlm_api module loads {r.stdout.split()}"


def test_cli_parser_loads_no_implementation():
    """`vlmpretrain --help` builds every subcommand's arguments without importing what runs them."""
    code = ("import sys; from vlm_api.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchx', 'vlm_operator', 'vlm_trainer', 'vlm_local', 'kopf', 'kubernetes')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every project module (a package is its __init__.py)."""
    out = {}
    for root in SOURCE_ROOTS:
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement, at module level or inside functions, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import Y`: Y is a module of X, or a name defined in X
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module: its nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_is_read_correctly():
    graph = import_graph()
    assert "vlm_api.schema" in graph["vlm_api.render"]           # `from . import ... schema as s`
    assert "vlm_api.launch" in graph["vlm_api.render"]
    assert "vlm_api.stage_policy" in graph["vlm_operator.core"]   # absolute, another package
    assert "vlm_api.validate" in graph["vlm_api.cli"]             # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Which packages each may import (docs/architecture.md): the API package none of the others,
# the operator and the trainer only the API, the local runner the API and the trainer.
# `vlm_api.cli` is the command line of all four: it imports a subcommand's module on use.
MAY_IMPORT = {
    "vlm_api": {"vlm_api"},
    "vlm_operator": {"vlm_api", "vlm_operator"},
    "vlm_trainer": {"vlm_api", "vlm_trainer"},
    "vlm_local": {"vlm_api", "vlm_trainer", "vlm_local"},
}


def test_packages_import_only_the_layers_below():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if a != "vlm_api.cli" and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]])
    assert not wrong, f"imports across layers: {wrong}"


def test_no_import_circles():
    """Also through imports inside functions: a circle there is hidden, not gone."""
    cycles = _cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {dict(sorted(long.items(), key=lambda kv: -kv[1]))}"
