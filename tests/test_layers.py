"""The import graph of src/mechdiff (read with ast, nothing imported): the runtime layers never import
the stage layer, and the module-level imports form no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LOWER = ("analyses", "patching", "report", "scale", "plots", "sites", "models", "texts")


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "mechdiff").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``[(imported module, line, at module level)]``: mechdiff modules only (``from a import b`` is
    ``a.b`` when that is a module, else ``a``; relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    typing_only = {id(x) for n in tree.body if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                   and n.test.id == "TYPE_CHECKING" for x in ast.walk(n)}   # never imported at run time
    for n in tree.body:        # module-level try / if blocks count as module level
        if isinstance(n, (ast.If, ast.Try)) and id(n) not in typing_only:
            top |= {id(x) for x in ast.walk(n) if not isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "mechdiff" or t.startswith("mechdiff."):
                found.append((t, node.lineno, id(node) in top))
    return found


def test_no_upward_imports():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        layer = name.split(".")[1] if name.count(".") else ""
        if layer not in LOWER:
            continue
        for target, line, _ in _imports(path, name, modules):
            if target == "mechdiff.experiments" or target.startswith("mechdiff.experiments."):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not bad, "runtime layers import the stage layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: sorted({t for t, _, top in _imports(path, name, modules) if top and t in modules and t != name})
             for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_sees_a_planted_upward_import(tmp_path):
    """The check can fail: an upward import written into a module is found."""
    f = tmp_path / "x.py"
    f.write_text("def g():\n    from mechdiff.experiments.steps import patch_measure\n", encoding="utf-8")
    assert _imports(f, "mechdiff.analyses.x", _modules()) == [("mechdiff.experiments.steps", 2, False)]
