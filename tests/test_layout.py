"""The house rules, read from the source: each package imports only the packages below it, no module imports
itself back through a cycle, imports sit at the top of a file (inside a function only for an optional or slow
dependency, with a comment saying so), every package says what it owns and may import, and no file grows
past 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "nanoseek"

# What each part of nanoseek may import (besides itself): data flows one way, lower never imports higher.
# "nanoseek" is the top-level package (its public API and __version__).
MAY_IMPORT = {
    "errors": set(),
    "fileio": set(),
    "model": {"errors"},
    "checkpoint": {"errors", "fileio", "model"},
    "engine": {"errors", "model", "checkpoint"},
    "sandbox": {"errors"},
    "tasks": {"errors", "checkpoint", "sandbox"},
    "train": {"errors", "fileio", "model", "checkpoint", "tasks"},
    "rl": {"errors", "fileio", "model", "checkpoint", "engine", "tasks", "train"},
    "server": {"nanoseek", "errors", "checkpoint", "engine"},
    "plan": {"errors", "model", "train"},
    "bench": {
        "nanoseek",
        "errors",
        "fileio",
        "model",
        "checkpoint",
        "engine",
        "tasks",
        "train",
        "rl",
        "server",
        "plan",
    },
    "cli": {
        "nanoseek",
        "errors",
        "fileio",
        "model",
        "checkpoint",
        "engine",
        "sandbox",
        "tasks",
        "train",
        "rl",
        "server",
        "bench",
        "plan",
    },
    "nanoseek": {"errors", "model", "checkpoint", "engine"},
}
# Imported inside functions, each with a comment: optional extras, references, and slow-to-import libraries.
LAZY_OK = {"transformers", "trl", "datasets", "fastapi", "uvicorn", "httpx", "openai", "matplotlib", "readline"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """`nanoseek.engine.text` -> "engine"; `nanoseek.fileio` -> "fileio"; `nanoseek` -> "nanoseek"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nanoseek"


def imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module, statement, inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}:{child.lineno}: relative import"
                base = child.module or ""
                # `from nanoseek.train import state` imports the module nanoseek.train.state
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(
                        (
                            sub
                            if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                            or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                            else base,
                            child,
                            in_function,
                        )
                    )
            visit(child, nested)

    visit(tree, False)
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_tree_is_where_the_test_looks():
    assert len(SOURCES) > 40 and (PACKAGE / "model" / "transformer.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_flow_one_way(path):
    here = part_of(module_name(path))
    for mod, node, _ in imports(path):
        if mod == "nanoseek" or mod.startswith("nanoseek."):
            there = part_of(mod)
            assert there == here or there in MAY_IMPORT[here], (
                f"{path.relative_to(REPO)}:{node.lineno}: {here} may not import {mod} ({there})"
            )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_are_at_the_top_unless_optional(path):
    lines = path.read_text().splitlines()
    for mod, node, in_function in imports(path):
        if not in_function:
            continue
        where = f"{path.relative_to(REPO)}:{node.lineno}: import of {mod} inside a function"
        assert mod.split(".")[0] in LAZY_OK, where
        said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
        assert said, where + " without a comment saying why"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        graph[module_name(path)] = {m for m, _, _ in imports(path) if m.startswith("nanoseek.") or m == "nanoseek"}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            elif state.get(dep) is None:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_package_says_what_it_owns_and_may_import(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and "Imports:" in doc, f"{path.relative_to(REPO)}: docstring with an 'Imports:' line"


@pytest.mark.parametrize(
    "path", sorted([*SOURCES, *(REPO / "tests").glob("*.py")]), ids=lambda p: str(p.relative_to(REPO))
)
def test_no_file_over_500_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(REPO)} has {n} lines"
