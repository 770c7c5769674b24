"""The four layers (docs/architecture.md "Layers"): imports only go down, and no module forms an
import cycle, lazy (in-function) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"models": 1, "cluster": 2, "actors": 3, "pipelines": 4}


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules a file imports, anywhere in it (``from pkg import mod`` resolves to pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in LAYERS:
                out.add(name)
    return out


def test_imports_only_go_down():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        mine = LAYERS[name.split(".")[0]]
        for dep in _imports(path, set(modules)):
            if LAYERS[dep.split(".")[0]] > mine:
                bad.append(f"{name} (layer {mine}) imports {dep} (layer {LAYERS[dep.split('.')[0]]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or (node.startswith(dep + ".") and dep in LAYERS):
                continue  # a package's own __init__
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_no_product_code_or_benchmark_imports_the_tests():
    paths = list(_modules().values()) + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [str(p) for p in paths for node in ast.walk(ast.parse(p.read_text()))
           if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("tests", "conftest"))
           or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "tests" for a in node.names))
           or (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value == "tests")]
    assert not bad, bad


def test_cluster_receives_stages_as_data():
    """No module under cluster/ names a pipelines module or compares anything against a stage's
    name: stages reach the infrastructure as demands, groups and entry points (pipelines.stage)."""
    from pipelines.stages import names

    stage_names, bad = set(names()), []
    for path in sorted((ROOT / "cluster").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "pipelines." in node.value \
                    and "\n" not in node.value:  # a string in code, not prose in a docstring
                bad.append(f"{path.name}:{node.lineno} names {node.value!r}")
            if isinstance(node, ast.Compare):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and sub.value in stage_names:
                        bad.append(f"{path.name}:{node.lineno} compares against the stage name {sub.value!r}")
    assert not bad, "\n".join(bad)
