"""The package's import graph: no cycles, and data flows one way (prepare -> records -> pipeline).

The graph is read from the source with `ast`, not by importing: every `import` statement of a
jaxlm module counts, at module level or inside a function, since a function-level import is a
cycle that is merely deferred until the function runs.
"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jaxlm"


def _modules(root: str = REPO) -> dict[str, str]:
    """Dotted name -> file path for every module of the package (packages as their __init__)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)[: -len(".py")]
            parts = rel.split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(dirpath, name)
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: str = REPO) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source.

    `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`. Parent
    packages imported implicitly by Python are not edges: only what the code names is.
    """
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # `import jaxlm.data.x` names jaxlm.data.x; trim to the longest known module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] if the graph has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = fully explored
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether `start` imports `goal`, directly or through other package modules."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_known_edges_of_every_kind(graph):
    # Guards the two tests below against passing on an empty or half-read graph.
    assert {"jaxlm.data.stream", "jaxlm.data.prepare", "jaxlm.loop"} <= set(graph)
    assert "jaxlm.errors" in graph["jaxlm.data.stream"]  # from jaxlm.errors import ConfigError
    assert "jaxlm.data.stream" in graph["jaxlm.loop"]  # from jaxlm.data import stream as ...
    assert "jaxlm.data.prepare" in graph["jaxlm.inputs"]  # imported inside load()
    assert "jaxlm.data.tokenizer" in graph["jaxlm.data.records"]  # inside _init_worker


def test_cycles_and_reach_are_detected_on_a_planted_graph(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from jaxlm.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import jaxlm.a\n")
    planted = import_graph(str(tmp_path))
    assert planted["jaxlm.sub.b"] == {"jaxlm.sub.c"}  # relative, function-level
    assert find_cycle(planted) == ["jaxlm.a", "jaxlm.sub.b", "jaxlm.sub.c", "jaxlm.a"]
    assert reaches(planted, "jaxlm.sub.c", "jaxlm.sub.b")
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(str(tmp_path))) == []


def test_the_package_has_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_pipeline_does_not_import_prepare(graph):
    # Data flows prepare -> records -> pipeline; training must not pull in preparation.
    assert not reaches(graph, "jaxlm.data.pipeline", "jaxlm.data.prepare")
