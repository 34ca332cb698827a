"""The layout's rules, checked from the source: packages import only downward, the client starts
without torch, and no file edits sys.path (README, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

ALLOWED = {
    "carmodel": set(),
    "training": {"carmodel"},
    "serving": {"carmodel"},
    "client": {"carmodel", "serving"},
    "bench": {"carmodel", "training", "serving", "client"},
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
    module.write_text("import os\nfrom training.data import scan\nimport serving.handler\nfrom . import sibling\n")
    assert first_party_imports(module) == {"training", "serving"}


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
