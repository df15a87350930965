"""The package's shape (issue 11): the augmentation side never pulls in training code, and no module grows past
~400 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_augmentation_side_imports_no_training_code():
    code = ("import sys, sip.augment.run, sip.augment.filter, sip.transforms, sip.data.bank, sip.data.mixing; "
            "print(sorted(m for m in sys.modules if m.startswith(('sip.train', 'sip.distill'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_is_over_about_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for folder in ("sip", "scripts") for p in (ROOT / folder).rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > 420} == {}


def _sip_modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "sip").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every sip module ``path`` imports, at module level or inside a function (a lazy import is still a loop)."""
    import ast

    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "sip":
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_loops_between_modules_or_packages():
    modules = _sip_modules()
    graph = {name: _imports_of(path, name, modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    # packages: sip.train -> sip.distill and sip.distill -> sip.train is a loop even through different modules
    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(pkg(name), set()).update(pkg(d) for d in deps if pkg(d) != pkg(name))
    assert _cycles(packages) == []


def test_no_function_is_over_about_80_lines():
    import ast

    long = {}
    for p in (ROOT / "sip").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 85:
                    long[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}
