"""The package structure: no import cycle inside qins, and imports only go down the layers.

Layers, lowest first (DESIGN.md, "Layers of the library"): a module may import from its own
layer and the ones below it, never above. Every import counts, also one inside a function
(a lazy import still ties the lower module to the upper one), except under TYPE_CHECKING.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a module belongs to the first entry that is its name or a prefix of it
LAYERS = (
    ("utilities", ("qins._compat", "qins._files", "qins._version")),
    ("codec", ("qins.codec",)),
    ("kernels", ("qins.kernels",)),
    ("metrics", ("qins.metrics",)),
    ("weights", ("qins.weights",)),
    ("kv", ("qins.kv",)),
    ("entropy", ("qins.entropy",)),
    ("eval", ("qins.eval",)),
    ("cli", ("qins.cli", "qins")),              # the package root re-exports from every layer
)


def _modules(src: Path, pkg: str = "qins") -> dict[str, tuple[Path, bool]]:
    mods = {}
    for f in (src / pkg).rglob("*.py"):
        parts = list(f.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return mods


def _resolve(name: str, cur: str, is_pkg: bool, level: int) -> str:
    if not level:
        return name
    base = cur.split(".") if is_pkg else cur.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_edges(src: Path = SRC, pkg: str = "qins") -> dict[str, set[str]]:
    """{module: qins modules it imports} from the source text (ast), lazy imports included."""
    mods = _modules(src, pkg)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        tree = ast.parse(f.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", m, is_pkg, node.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and not m.startswith(t + "."):    # a package's own __init__ is not an edge
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "qins"):
            return i
    if module == "qins":
        return len(LAYERS) - 1
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS (and DESIGN.md)")


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, ts in edges.items() for t in ts if layer_of(t) > layer_of(m))


def test_no_import_cycle():
    assert cycles(import_edges()) == []


def test_imports_only_go_down():
    assert upward_imports(import_edges()) == []


def test_every_module_has_a_layer():
    for m in import_edges():
        layer_of(m)


def test_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The checks above on a package built to break both rules."""
    pkg = tmp_path / "qins"
    (pkg / "codec").mkdir(parents=True)
    (pkg / "eval").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "codec" / "__init__.py").write_text("")
    (pkg / "eval" / "__init__.py").write_text("")
    (pkg / "codec" / "a.py").write_text("def f():\n    from . import b\n")      # lazy, still counts
    (pkg / "codec" / "b.py").write_text("from .a import f\nfrom ..eval import report\n")
    (pkg / "eval" / "report.py").write_text("import json\n")
    edges = import_edges(tmp_path)
    assert cycles(edges) == [["qins.codec.a", "qins.codec.b"]]
    assert upward_imports(edges) == ["qins.codec.b (codec) imports qins.eval.report (eval)"]


@pytest.mark.parametrize("module", ["qins.transport", "qins.kv.probe", "qins.kv.report"])
def test_experiments_and_scripts_live_outside_the_package(module):
    assert module not in import_edges()
