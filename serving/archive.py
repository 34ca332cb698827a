"""Build a TorchServe .mar from an export directory (carmodel/export.py's contract).

The archive holds exactly: the handler (handler/car_handler.py), the export's serving files (weights,
index_to_name.json, model.yaml, calibration.json, the int8 model when it is served), a model-config.yaml
(handler/settings.py) and the modules of handler/ and carmodel/ that the handler imports, found from
its imports - nothing else.

The model name is derived from the export's architecture (`<arch>_cars`); asking for another
architecture's name is refused.

    build-mar --export models/efficientnet_lite0_cars --version 1.0
    build-mar --export exports/resnet50_cars --version 2.0 --batch_size 8

An export fetched from the MLflow registry (`training.register --download`, `make release-archive`)
is versioned as the registry's version (3 -> 3.0) unless --version says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import carmodel
import handler
from carmodel import paths, typed
from carmodel.errors import exit_with
from carmodel.export import REGISTERED_VERSION, ExportDir, ExportError
from handler.settings import HandlerSettings, WorkerSettings

# The packages the handler may import from this project, where they are installed (a checkout, or
# site-packages after a plain `pip install .`): the archive packs their source files from there.
FIRST_PARTY = {"carmodel": Path(carmodel.__file__).parent, "handler": Path(handler.__file__).parent}
# Not handler.py: TorchServe imports the handler file by its name from the archive's root, where a
# module named `handler` would clash with the handler/ package beside it.
HANDLER = Path(handler.__file__).parent / "car_handler.py"
# TorchServe's eager-model path wants a model file; our handler builds the network from
# model.yaml (carmodel.models), so the architecture registry is that file.
MODEL_FILE = Path(carmodel.__file__).parent / "models.py"
ARCHIVER = Path(sys.executable).parent / "torch-model-archiver"  # installed with torchserve, beside this Python
DEFAULT_VERSION = "1.0"


class BuildError(RuntimeError):
    pass


def archive_name(model_name: str, version: str) -> str:
    return f"{model_name}_v{version}.mar"


def model_config(workers: WorkerSettings, settings: HandlerSettings) -> dict:
    """model-config.yaml: TorchServe's per-model settings plus our handler's own section."""
    return {**workers.to_model_config(), "handler": typed.to_dict(settings)}


def handler_modules(entry: Path = HANDLER) -> list[Path]:
    """The handler's own import closure within FIRST_PARTY, package __init__ files included: what the
    archive must carry, found by reading the imports rather than kept as a list."""
    found, todo = set(), [entry]
    while todo:
        source = todo.pop()
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] not in FIRST_PARTY:
                    continue
                for path in module_files(name):
                    if path not in found:
                        found.add(path)
                        todo.append(path)
    return sorted(found - {entry})


def module_files(name: str) -> list[Path]:
    """The file of module `name` and the __init__.py of each package above it (none if `name` is not a module)."""
    top, *parts = name.split(".")
    package = FIRST_PARTY[top]
    files = [package.joinpath(*parts[:i], "__init__.py") for i in range(len(parts) + 1)]
    files.append(package.joinpath(*parts).with_suffix(".py"))
    return [f for f in files if f.is_file()]


def archived_name(module: Path) -> Path:
    """A first-party module's path in the archive: below its package's folder, e.g. carmodel/images.py."""
    for top, package in FIRST_PARTY.items():
        if module.is_relative_to(package):
            return Path(top, module.relative_to(package))
    raise BuildError(f"{module} is not in {', '.join(FIRST_PARTY)}")


def stage(export: ExportDir, workers: WorkerSettings, settings: HandlerSettings, tmp: Path) -> tuple[Path, Path]:
    """Copy what the archive needs into a staging folder; returns (extra-files dir, model-config)."""
    extra = tmp / "extra"
    for module in handler_modules():
        target = extra / archived_name(module)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)
    if settings.precision == "int8" and not export.has_int8:
        raise BuildError(
            f"--precision int8 needs {export.int8_xml}: run python -m training.quantize --export {export.path}"
        )
    for path in export.serving_files(with_int8=settings.precision in ("auto", "int8")):
        if path != export.weights:  # the weights travel as the archive's serialized file
            shutil.copy2(path, extra / path.name)
    model_config_path = tmp / "model-config.yaml"
    model_config_path.write_text(yaml.safe_dump(model_config(workers, settings), sort_keys=False))
    return extra, model_config_path


def build(args) -> Path:
    workers = typed.from_dict(WorkerSettings, typed.flags_given(args, WorkerSettings))
    settings = typed.from_dict(HandlerSettings, typed.flags_given(args, HandlerSettings))
    store = Path(args.model_store)
    export = ExportDir(Path(args.export).resolve())
    return build_from(
        export, store, args.version or export_version(export), workers, settings, args.model_name, args.force
    )


def export_version(export: ExportDir) -> str:
    """The registry's version for an export fetched from it (`training.register --download`: 3 -> 3.0), else 1.0."""
    registered = export.path / REGISTERED_VERSION
    return f"{registered.read_text().strip()}.0" if registered.is_file() else DEFAULT_VERSION


def build_from(
    export: ExportDir,
    store: Path,
    version: str,
    workers: WorkerSettings,
    settings: HandlerSettings,
    model_name: str | None = None,
    force: bool = False,
) -> Path:
    """`export`'s archive <name>_v<version>.mar in `store`, served with these settings."""
    try:
        export.validate(model_name)
    except ExportError as err:
        raise BuildError(str(err)) from err
    store = store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    target = store / archive_name(export.model_name, version)
    if target.exists() and not force:
        raise BuildError(f"{target} exists (use --force to rebuild)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extra, model_config_path = stage(export, workers, settings, tmp)
        cmd = [
            str(ARCHIVER),
            *("--model-name", export.model_name, "--version", version),
            *("--model-file", str(MODEL_FILE), "--serialized-file", str(export.weights)),
            *("--handler", str(HANDLER), "--extra-files", str(extra), "--config-file", str(model_config_path)),
            *("--export-path", str(tmp), "--force"),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"torch-model-archiver failed:\n{result.stdout}{result.stderr}")
        shutil.move(tmp / f"{export.model_name}.mar", target)
    return target


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--export", default=str(paths.default_export()), help="training.export output directory (./models/<default>)"
    )
    p.add_argument(
        "--version",
        help=f"model version recorded in the archive (default {DEFAULT_VERSION}, or the registry's version)",
    )
    p.add_argument("--model_name", help="checked against the export's architecture (default: <arch>_cars)")
    p.add_argument("--model_store", default=str(paths.model_store()), help="default: ./model_store")
    p.add_argument("--force", action="store_true", help="overwrite an existing archive")
    typed.add_arguments(p, WorkerSettings)
    typed.add_arguments(p, HandlerSettings)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = build(args)
    except (BuildError, typed.SettingsError) as err:
        return exit_with(err)
    print(f"built {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
