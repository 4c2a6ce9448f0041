"""The package layering, enforced: which module may import which (see docs/architecture.md, "Layers").

A module of the engine imports only modules of lower layers (applications also their own package's modules);
no module imports a project module inside a function (command lines excepted: they load heavy modules lazily),
and no module imports another module's private name.
"""

from __future__ import annotations

import ast
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
    {"inputs", "drafter", "runner"},
    {"batch"},
    {"engine"},
    {"ensemble", "multidraft", "scheduler"},
    {"bench", "summarize"},  # applications: packages over the engine
    {"cli"},
]
#: a command line's lazy loading, and a package that loads its optional dependency (FastAPI) on first use
LAZY_IMPORTS_ALLOWED = {"lookahead/cli.py", "integrations/lookahead_server/cli.py",
                        "integrations/lookahead_server/__init__.py"}


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
