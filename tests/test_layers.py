"""The package's layering (docs/architecture.md), read from the source: no import cycle among
the modules of flminillm (module-level and function-level imports alike), and the core
never imports kfp, the pipelines or the components, directly or through another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flminillm"
# the application layer may run pipelines; everything else of the package is the core
APPLICATION = ("flminillm.cli", "flminillm.runs", "flminillm.bench")
FORBIDDEN_IN_CORE = ("kfp", "pipelines", "components")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports anywhere in its source (resolved to package modules
    where they are ones; external modules by their full dotted name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:  # `from pkg import module` imports that module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports} plus {module: external imports} under '!ext'."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = _imported(name, path, modules)
        own = {m for m in imported if m in modules and m != name}
        # importing a submodule runs its package's __init__ too
        own |= {m.rpartition(".")[0] for m in own if m.rpartition(".")[0] in modules}
        graph[name] = own - {name}
        graph[f"!ext:{name}"] = {m for m in imported if m.split(".")[0] != PACKAGE}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_module_and_function_level_imports():
    g = import_graph()
    assert "flminillm.ledger" in g["flminillm.steps"]  # module level
    assert "flminillm.aggregate" in g["flminillm.steps"]  # inside a function
    assert "flminillm.steps" in g["flminillm.invoke"]  # `from flminillm.steps import ...`
    assert "pipelines.local" in g["!ext:flminillm.bench.rounds"]  # an external import


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    graph = {k: v for k, v in import_graph().items() if not k.startswith("!ext:")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_core_never_imports_kfp_pipelines_or_components():
    g = import_graph()
    core = [m for m in g if not m.startswith("!ext:") and not m.startswith(APPLICATION)]
    assert "flminillm.steps" in core and "flminillm.invoke" in core
    for module in core:
        reached, todo = set(), [module]
        while todo:  # every package module `module` imports, directly or not
            m = todo.pop()
            if m not in reached:
                reached.add(m)
                todo.extend(g[m])
        bad = sorted(
            f"{m} imports {ext}"
            for m in reached
            for ext in g[f"!ext:{m}"]
            if ext.split(".")[0] in FORBIDDEN_IN_CORE
        )
        assert not bad, f"{module} reaches the pipeline layer: {bad}"


def test_a_kfp_task_does_not_import_torch_before_it_forwards_its_step():
    """Every KFP task imports the step registry and the components; under the local runner
    it then forwards the call to the warm step server. Importing torch there (2 s of CPU per
    task) made the KFP tests 2.4x slower once: keep those imports light."""
    import subprocess
    import sys

    code = (
        "import sys, flminillm.invoke, components.round_steps; "
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout  # fmt: skip
    assert out.strip() == "[]"
