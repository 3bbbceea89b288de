"""Layout rules from DESIGN.md, read from the source: no module imports another's `_private` names, no two
modules import each other (directly or round a longer loop), and no engine reaches extract.py."""

from __future__ import annotations

import ast
import re
import importlib
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "embedkit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, modules: dict) -> list[tuple[str, list[str], int]]:
    """(embedkit module imported, names taken from it, line) for every import, top level or inside a function."""
    package = name if name in modules and (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() \
        else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "embedkit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{up}.{base}" if base else up
            if base.split(".")[0] != "embedkit":
                continue
            names = [a.name for a in node.names]
            # `from embedkit.engines import ray` imports the module embedkit.engines.ray
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            found += [(m, [], node.lineno) for m in submodules]
            taken = [n for n in names if f"{base}.{n}" not in modules]
            if taken or not submodules:  # a package's submodules alone do not import from the package
                found.append((base, taken, node.lineno))
    return [(m, names, line) for m, names, line in found if m in modules and m != name]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _, _ in _imports(name, tree, modules)} for name, tree in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = [f"{name}:{line} imports {n} from {m}" for name, tree in modules.items()
           for m, names, line in _imports(name, tree, modules)
           for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # a module that can reach itself sits on a loop; lazy imports inside functions count too
    loops = sorted(name for name in graph if name in _reachable(graph, name))
    assert not loops, f"modules on an import cycle: {loops}"


def test_engines_never_reach_extract_and_extract_reaches_engines_only_through_the_registry():
    graph = _graph()
    engines = [m for m in graph if m.startswith("embedkit.engines")]
    assert {"embedkit.engines.base", "embedkit.engines.local", "embedkit.engines.ray"} <= set(engines)
    for engine in engines:
        assert "embedkit.extract" not in _reachable(graph, engine) | {engine}, engine
    # extract picks an engine by name (engines.ENGINES), never by importing one: a third engine is one file
    assert not {m for m in graph["embedkit.extract"] if m.startswith("embedkit.engines.")} - {"embedkit.engines.base"}


def test_every_registered_engine_has_the_engine_interface():
    from embedkit.engines import ENGINES
    from embedkit.engines.base import Engine

    for name, module in ENGINES.items():
        engine = importlib.import_module(module)
        assert isinstance(engine, Engine), name


def test_readme_architecture_names_only_files_that_exist():
    """The README's architecture section must match the code: every module or folder it names exists."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"[\w/]+\.py|\b\w+/(?=[\s,)]|$)", section, flags=re.M))
    existing = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")} | {p.name for p in PACKAGE.rglob("*")}
    existing |= {f"{p.name}/" for p in PACKAGE.rglob("*") if p.is_dir()}
    existing |= {f"{p.relative_to(PACKAGE)}/" for p in PACKAGE.rglob("*") if p.is_dir()}
    assert len(named) > 20  # the section names the files of every step
    missing = sorted(n for n in named if n not in existing)
    assert not missing, f"README architecture names files that do not exist: {missing}"
