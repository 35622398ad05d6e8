"""The shape of the code, held against its own imports (docs/structures.md): the engine
knows token ids only and imports nothing above it; no module imports itself back through
others; no private name crosses a package; the engine core stays small and free of
feature names; tests import helpers, never other test modules. Read from the source with
`ast` (nothing is imported or run), function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
ENGINE_MAY_NOT_IMPORT = ("bastion.serving", "bastion.guard", "bastion.server", "bastion.adapters", "bastion.bench",
                         "bastion.federated", "bastion.cli", "bastion.chat")
# the loop files: what runs every step (the data types it hands out, outputs.py and
# sampling_params.py, are not counted)
ENGINE_CORE = ("engine/llm_engine.py", "engine/scheduler.py", "engine/model_runner.py", "engine/sampler.py",
               "engine/request.py", "engine/kv_cache/block_manager.py", "engine/kv_cache/prefix_cache.py")
FEATURE_FREE = ("engine/scheduler.py", "engine/kv_cache/block_manager.py", "engine/sampler.py", "engine/llm_engine.py")


def _module(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], root: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of the project in `path`."""
    me = _module(path, root)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = me.split(".")
                pkg = pkg[: len(pkg) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            for n in names:  # `from pkg import module` imports that module
                if f"{base}.{n}" in modules:
                    out.append((f"{base}.{n}", []))
            rest = [n for n in names if f"{base}.{n}" not in modules]
            if rest:
                out.append((base, rest))
    return [(m, ns) for m, ns in out if m in modules]


def _graph():
    files = {_module(p, SRC): p for p in SRC.rglob("*.py")}
    modules = set(files)
    return files, {m: _imports(p, modules, SRC) for m, p in files.items()}


def test_the_engine_imports_nothing_above_it():
    files, graph = _graph()
    bad = [(m, dep) for m, deps in graph.items() if m.startswith("bastion.engine")
           for dep, _ in deps if dep.startswith(ENGINE_MAY_NOT_IMPORT)]
    assert not bad, bad


def test_no_import_cycles():
    _, graph = _graph()
    edges = {m: {d for d, _ in deps if d != m} for m, deps in graph.items()}
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not sccs, sccs


def test_no_private_name_crosses_a_package():
    _, graph = _graph()
    bad = [(m, dep, n) for m, deps in graph.items() for dep, names in deps for n in names
           if n.startswith("_") and dep.rsplit(".", 1)[0] != m.rsplit(".", 1)[0]]
    assert not bad, bad


def test_the_engine_core_is_small_and_names_no_feature():
    lines = {f: len((SRC / "bastion" / f).read_text().splitlines()) for f in ENGINE_CORE}
    assert sum(lines.values()) <= 1000, lines
    for f in FEATURE_FREE:
        text = (SRC / "bastion" / f).read_text().lower()
        assert not [w for w in ("cleangen", "kivi", "lora") if w in text], f


@pytest.mark.parametrize("path", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")))
def test_no_source_file_grows_past_400_lines(path):
    n = len((SRC / path).read_text().splitlines())
    assert n <= 400, f"{path}: {n} lines; split it along a seam"


def test_tests_import_helpers_not_other_tests():
    modules = {_module(p, TESTS.parent) for p in TESTS.rglob("*.py")}
    bad = [(str(p.relative_to(TESTS)), dep) for p in TESTS.rglob("*.py")
           for dep, _ in _imports(p, modules, TESTS.parent) if dep.rsplit(".", 1)[-1].startswith("test_")]
    assert not bad, bad
