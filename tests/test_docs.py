"""The README's and docs/'s commands exist as shown: every `python -m ...` module and project command
answers `--help` and knows every flag the documents give it, and every `make` target exists.
(The commands' behaviour is pinned by their own tests; this keeps the documents from drifting.)

Every `--help` runs in this one process, as its command line would run it (runpy for `python -m`, the
console script's entry point from pyproject.toml): an interpreter per command would cost seconds each."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from functools import cache

import pytest
from helpers import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("serve", "build-mar", "predict-dir", "explain", "versions", "draw-box", "demo")
FENCE = re.compile(r"```(?:bash|console|sh)?\n(.*?)```", re.S)


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(document, command, its words) for each line of a shell block that runs one of the project's commands."""
    found = []
    for doc in DOCUMENTS:
        for block in FENCE.findall(doc.read_text()):
            block = re.sub(r"\\\n\s*", " ", block)  # a command continued over lines is one command
            lines = [part for line in block.splitlines() for part in line.split(" && ")]
            for line in lines:
                line = line.removeprefix("$ ").split(" #")[0].strip().rstrip("\\").strip()
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                if words[:2] == [".venv/bin/python", "-m"] or words[:2] == ["python", "-m"]:
                    words = ["python", *words[1:]]
                elif words and words[0].removeprefix(".venv/bin/") in SCRIPTS:
                    words = [words[0].removeprefix(".venv/bin/"), *words[1:]]
                elif not (words and words[0] == "make" and len(words) > 1):
                    continue
                found.append((doc.name, line, words))
    return found


COMMANDS = shown_commands()


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENTRY_POINTS = PYPROJECT["project"]["scripts"]
PACKAGES = {name.rstrip("*") for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}


@cache
def help_text(program: tuple[str, ...]) -> str:
    """`<program> --help`'s output, its exit status checked: `python -m <module> [sub]` or `<script> [sub]`."""
    if program[0] == "python" and program[2].split(".")[0] not in PACKAGES:  # another project's (protoc: C++ output)
        result = subprocess.run([sys.executable, *program[1:], "--help"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, f"{' '.join(program)} --help: {result.stderr[-500:]}"
        return result.stdout
    if program[0] == "python":
        module, args = program[2], list(program[3:])
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        module, function = ENTRY_POINTS[program[0]].split(":")
        args = list(program[1:])
        run = lambda: sys.exit(getattr(importlib.import_module(module), function)())  # noqa: E731
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exited,
    ):
        patch.chdir(ROOT)
        patch.setattr(sys, "argv", [program[0], *args, "--help"])
        run()
    assert exited.value.code in (0, None), f"{' '.join(program)} --help: {err.getvalue()[-500:]}"
    return out.getvalue()


@cache
def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def test_the_documents_show_commands():
    assert len(COMMANDS) > 30 and {words[0] for _, _, words in COMMANDS} >= {"python", "make", "serve", "predict-dir"}


@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")  # runpy, a module run twice
@pytest.mark.parametrize(("doc", "line", "words"), COMMANDS, ids=[f"{d}: {c[:60]}" for d, c, _ in COMMANDS])
def test_every_shown_command_exists_with_its_flags(doc, line, words):
    if words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        assert set(targets) <= make_targets(), f"{doc}: {line}"
        return
    program = tuple(words[:3]) if words[0] == "python" else (words[0],)
    text = help_text(program)
    rest = words[len(program) :]
    if rest and re.search(r"\{[\w,-]*\b" + re.escape(rest[0]) + r"\b[\w,-]*\}", text):  # a subcommand
        text = help_text((*program, rest[0]))
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    missing = {f for f in flags if f not in text and f != "--help"}
    assert not missing, f"{doc}: {line}: {sorted(missing)} not in its --help"
