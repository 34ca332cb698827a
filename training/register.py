"""Register an approved export in the MLflow model registry, or move an alias to a version.

    python -m training.register --export models/efficientnet_lite0_cars --alias candidate
    python -m training.register --name efficientnet_lite0_cars --version 3 --alias production
    python -m training.register --name efficientnet_lite0_cars --alias production \\
        --download models/efficientnet_lite0_cars

The export folder (weights, classes, config, metrics, int8 model) is logged to the run that
trained it (its mlflow_run.json) and registered as a new version of `<arch>_cars`, with its
held-out metrics as tags (what training.gate compares against). Run the gate first; CI does
(.github/workflows/train.yml). Prints the version number.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from carmodel.errors import exit_with
from carmodel.export import REGISTERED_VERSION, TRAINING_CONFIG, ExportDir
from training import config as config_lib
from training import registry, tracking


def download(reference: str, dest: Path) -> None:
    """Replace `dest` with the registered export (fetched next to it first, so a failure leaves it alone)."""
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.is_dir() else None) as tmp:
        fetched, version = registry.download_registered(reference, Path(tmp))
        # build-mar versions the archive as the registry does (version 3 -> 3.0)
        (fetched / REGISTERED_VERSION).write_text(f"{version}\n")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(fetched, dest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, help="a training.export folder to register as a new version")
    parser.add_argument("--name", help="registered model name (default: the export's <arch>_cars)")
    parser.add_argument("--version", help="with --name and --alias: point the alias at this existing version")
    parser.add_argument("--alias", help="e.g. candidate, production")
    parser.add_argument("--download", type=Path, help="with --name and --alias or --version: fetch that export here")
    args = parser.parse_args(argv)
    try:
        if args.download and args.name and (args.alias or args.version):
            reference = f"{args.name}@{args.alias}" if args.alias else f"{args.name}/{args.version}"
            download(reference, args.download)
            print(f"{reference} -> {args.download}")
            return 0
        if args.export:
            export = ExportDir(args.export)
            cfg = config_lib.load(export.record(TRAINING_CONFIG))
            name = args.name or export.model_name
            version = tracking.register_export(args.export, name, args.alias, cfg.tracking.experiment)
        elif args.name and args.version and args.alias:
            name, version = args.name, args.version
            if registry.model_version(f"{name}/{version}") is None:
                raise tracking.TrackingError(f"{name} has no version {version} in {tracking.tracking_uri()}")
            tracking.set_alias(name, version, args.alias)
        else:
            parser.error("give --export, or --name, --version and --alias")
    except (tracking.TrackingError, config_lib.ConfigError, FileNotFoundError) as err:
        return exit_with(err)
    alias = f" (@{args.alias})" if args.alias else ""
    print(f"{name} version {version}{alias} in {tracking.tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
