"""The package layering, enforced: which module may import which (see docs/architecture.md, "Layers").

A module of the engine imports only modules of lower layers (applications also their own package's modules);
no module imports a project module inside a function (command lines excepted: they load heavy modules lazily) or
by an ``importlib`` string, no module imports another module's private name, and the packages' dependencies (static
imports, imports inside functions, ``importlib`` strings and entry points) have no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("lookahead", "langchain_lookahead", "lookahead_server", "lookahead_ray")

#: lowest first; a module may import modules of strictly lower layers only
LAYERS: list[set[str]] = [
    {"files", "config", "sampling", "tree", "verify", "kvcache", "kernels", "prompts", "argtypes", "emitter",
     "reference", "agreement", "provenance"},
    {"trie", "budget", "outputs", "models"},
    {"store"},  # the draft store: drafts like the trie (its oracle) and shares its Draft and delta types
    {"inputs", "drafter", "runner", "pacing"},
    {"batch"},
    {"engine"},
    {"ensemble", "multidraft", "scheduler"},
    {"bench", "summarize"},  # applications: packages over the engine
    {"cli"},
]
#: a command line's lazy loading (its heavy modules, only when a command runs)
LAZY_IMPORTS_ALLOWED = {"lookahead/cli.py", "integrations/lookahead_server/cli.py"}
#: the calls that import a module named by a string
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"lookahead.{module} has no layer: add it to LAYERS in {Path(__file__).name}")


def source_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, bool, str, list[str]]]:
    """Every import of ``path`` as (line, inside a function, absolute module name, imported names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = list(path.relative_to(ROOT).parent.parts)
    if package and package[0] == "integrations":
        package = package[1:]
    in_function = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for sub in ast.walk(node) if sub is not node}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            base = package[: len(package) - node.level + 1] if node.level else []
            if node.module is None:  # `from . import files`: each name is a module
                found.extend((node.lineno, id(node) in in_function, ".".join(base + [n]), []) for n in names)
                continue
            found.append((node.lineno, id(node) in in_function, ".".join(base + [node.module]), names))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, id(node) in in_function, a.name, []) for a in node.names)
    return found


def string_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every ``importlib.import_module("name")`` / ``__import__("name")`` of a literal name, as (line, name)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))
    return found


def string_constants(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def unit_of(module: str) -> str | None:
    """The unit a module belongs to in the dependency graph: a layer of the engine (``lookahead.summarize``) or an
    integration package (``lookahead_ray``); None for modules outside the project."""
    parts = module.split(".")
    if parts[0] == "lookahead":
        return "lookahead" if len(parts) == 1 else f"lookahead.{parts[1]}"
    return parts[0] if parts[0] in PROJECT_PACKAGES else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[1:] if parts[0] == "integrations" else parts)


def project_entry_points() -> dict[str, dict[str, str]]:
    """The entry points ``pyproject.toml`` declares, as installed (``pip install -e .`` registers them), but the
    console scripts: group -> {name: "module:attr"}."""
    groups: dict[str, dict[str, str]] = {}
    for ep in distribution("lookahead-rag").entry_points:
        if ep.group != "console_scripts":
            groups.setdefault(ep.group, {})[ep.name] = ep.value
    return groups


def dependency_graph(entry_points: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, set[str]]:
    """Unit -> the units it depends on, through static imports, imports inside functions, ``importlib`` strings and
    entry points (``group -> {name: "module:attr"}``; default: the installed project's, :func:`project_entry_points`).
    An entry point makes its plugin depend on the unit that loads its group (the one whose source names the group):
    the loader never names the plugin."""
    if entry_points is None:
        entry_points = project_entry_points()
    graph: dict[str, set[str]] = {}
    loaders: dict[str, set[str]] = {}
    for path in source_files("lookahead", "integrations"):
        own = unit_of(module_name(path))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = [m for _, _, m, _ in imported_modules(path)] + [m for _, m in string_imports(tree)]
        graph.setdefault(own, set()).update(u for u in map(unit_of, targets) if u not in (None, own))
        for group in string_constants(tree) & set(entry_points):
            loaders.setdefault(group, set()).add(own)
    for group, plugins in entry_points.items():
        for value in plugins.values():
            plugin = unit_of(value.split(":")[0])
            if plugin is not None:
                graph.setdefault(plugin, set()).update(loaders.get(group, set()) - {plugin})
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """A cycle of ``graph`` as its nodes, the first repeated at the end; empty when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_engine_modules_import_only_lower_layers():
    wrong = []
    for path in source_files("lookahead"):
        relative = path.relative_to(ROOT / "lookahead").with_suffix("")
        if relative.name == "__init__" and len(relative.parts) == 1:
            continue
        own = ".".join(relative.parts)
        own_rank = layer_of(own)
        for _, _, module, _ in imported_modules(path):
            if not module.startswith("lookahead.") and module != "lookahead":
                continue
            target = module.removeprefix("lookahead.")
            if target.split(".")[0] == own.split(".")[0] and "." in own:  # inside an application package
                continue
            if layer_of(target) >= own_rank:
                wrong.append(f"{own} (layer {own_rank}) imports {target} (layer {layer_of(target)})")
    assert wrong == []


def test_the_engine_never_imports_an_integration():
    wrong = [f"{path.relative_to(ROOT)} imports {module}" for path in source_files("lookahead")
             for _, _, module, _ in imported_modules(path) if module.split(".")[0] in PROJECT_PACKAGES[1:]]
    assert wrong == []


def test_no_function_local_imports_of_project_modules():
    wrong = []
    for path in source_files("lookahead", "integrations"):
        name = str(path.relative_to(ROOT))
        if name in LAZY_IMPORTS_ALLOWED:
            continue
        for line, local, module, _ in imported_modules(path):
            if local and module.split(".")[0] in PROJECT_PACKAGES:
                wrong.append(f"{name}:{line} imports {module} inside a function")
    assert wrong == []


def test_no_project_module_is_imported_by_an_importlib_string():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module} by a string"
             for path in source_files("lookahead", "integrations")
             for line, module in string_imports(ast.parse(path.read_text(encoding="utf-8")))
             if unit_of(module) is not None]
    assert wrong == []


def test_the_package_dependencies_have_no_cycle():
    assert find_cycle(dependency_graph()) == []


def test_every_entry_point_group_has_a_loader_in_the_project():
    groups = project_entry_points()
    assert {"lookahead.commands", "lookahead.summarize.runners", "lookahead_server.runners"} <= set(groups)
    named = set().union(*(string_constants(ast.parse(p.read_text(encoding="utf-8")))
                          for p in source_files("lookahead", "integrations")))
    assert sorted(set(groups) - named) == []


def test_a_cycle_through_an_importlib_string_or_an_entry_point_is_caught():
    assert string_imports(ast.parse("import importlib\nimportlib.import_module('lookahead_ray.commands')")) == [
        (2, "lookahead_ray.commands")]
    graph = dependency_graph()
    assert "lookahead.summarize" in graph["lookahead_ray"]  # the plugin depends on the command it runs for
    graph["lookahead.summarize"].add("lookahead_ray")  # what loading lookahead_ray.commands by name would add
    assert find_cycle(graph)
    # the engine registering a command: the CLI, which loads the group, imports the engine
    plugin = dependency_graph({"lookahead.commands": {"hook": "lookahead.engine:add_parser"}})
    assert "lookahead.cli" in plugin["lookahead.engine"] and find_cycle(plugin)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
             for path in source_files("lookahead", "integrations", "scripts", "examples")
             for line, _, module, names in imported_modules(path)
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert wrong == []


@pytest.mark.parametrize("module", ["trie", "tree", "verify", "kvcache", "budget", "sampling", "kernels", "outputs",
                                    "emitter"])
def test_leaf_modules_import_no_upper_module(module):
    rank = layer_of(module)
    assert rank <= 1
    imports = [m.removeprefix("lookahead.") for _, _, m, _ in imported_modules(ROOT / "lookahead" / f"{module}.py")
               if m.startswith("lookahead.")]
    assert all(layer_of(m) < rank for m in imports), imports
