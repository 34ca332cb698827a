"""The layout's rules, checked from the source: packages import only downward, no two modules import
each other (however far round), the client starts without torch, and no file edits sys.path
(docs/development.md, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

ALLOWED = {
    "carmodel": set(),
    "handler": {"carmodel"},
    "training": {"carmodel"},
    "serving": {"carmodel", "handler"},
    "client": {"carmodel", "handler", "serving"},
    "bench": {"carmodel", "handler", "training", "serving", "client"},
}


def first_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_downward(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        upward = first_party_imports(path) - ALLOWED[package] - {package}
        if upward:
            wrong[str(path.relative_to(ROOT))] = sorted(upward)
    assert not wrong, wrong


def test_the_checker_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom training.data import scan\nimport serving.kserve\nfrom . import sibling\n")
    assert first_party_imports(module) == {"training", "serving"}


def module_imports(path: Path) -> set[str]:
    """The first-party modules `path` imports, anywhere in it (a function's lazy import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        found |= {name for name in names if name.split(".")[0] in ALLOWED}
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (packages' __init__ files as the package's name)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in ALLOWED
        for path in (ROOT / package).rglob("*.py")
    }
    return {name: module_imports(path) & set(modules) - {name} for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of the graph, each once (from its smallest module)."""
    cycles = []

    def walk(start: str, node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                cycles.append([*trail, start])
            elif nxt > start and nxt not in trail:
                walk(start, nxt, [*trail, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


def test_no_two_modules_import_each_other():
    assert import_cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle_however_far_round():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_file_touches_sys_path():
    offenders = [
        str(path.relative_to(ROOT))
        for package in [*ALLOWED, "tests", "scripts", "deploy"]
        for path in (ROOT / package).rglob("*.py")
        if "sys.path.insert" in path.read_text() or "sys.path.append" in path.read_text()
    ]
    assert offenders == [path for path in offenders if path == "tests/test_layout.py"]


@pytest.mark.parametrize(
    "module", ["client.predict_dir", "client.versions", "client.explain", "client.draw_box", "serving.serve"]
)
def test_clients_start_without_torch(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"importing {module} loads torch"
