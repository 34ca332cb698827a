"""The CI/CD workflows: valid against GitHub's workflow schema (check-jsonschema's offline copy),
and every command they run is a make target or script that exists here - nothing lives only in YAML."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
MAKE_CALL = re.compile(r"(?:^|&&|\|\||;|\n)\s*make\s+([a-z][\w-]*)")
SCRIPT_CALL = re.compile(r"(?:python|bash)\s+((?:deploy|scripts|training|bench|\.ci)/[\w/.-]+)")
MODULE_CALL = re.compile(r"python\s+-m\s+([\w.]+)")


def steps() -> list[tuple[str, dict]]:
    found = []
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            found += [(path.name, step) for step in job["steps"]]
    return found


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def test_the_three_workflows_exist():
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "release.yml", "train.yml"]


def test_workflows_match_githubs_schema():
    checker = shutil.which("check-jsonschema") or str(Path(__import__("sys").executable).parent / "check-jsonschema")
    if not Path(checker).exists():
        pytest.skip("check-jsonschema is not installed (requirements/dev.txt)")
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_command_is_a_make_target_or_a_script_of_the_project():
    targets, calls = make_targets(), 0
    for name, step in steps():
        command = step.get("run", "")
        for target in MAKE_CALL.findall(command):
            assert target in targets, f"{name}: `make {target}` is not a Makefile target"
            calls += 1
        for script in SCRIPT_CALL.findall(command):
            assert (ROOT / script).exists(), f"{name}: {script} does not exist"
        for module in MODULE_CALL.findall(command):
            assert importlib.util.find_spec(module) is not None, f"{name}: python -m {module}: no such module"
    assert calls >= 10


def test_ci_runs_what_the_readme_says():
    (ci,) = [step for name, step in steps() if name == "ci.yml" and "run" in step and ".ci/run" in step["run"]]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_pipeline_order_train_gate_register_archive_image():
    train = [step.get("run", "") for name, step in steps() if name == "train.yml"]
    order = ["make train", "make gate", "make register", "make release-archive", "make image"]
    positions = [next(i for i, cmd in enumerate(train) if stage in cmd) for stage in order]
    assert positions == sorted(positions)
