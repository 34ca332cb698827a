"""Build a TorchServe .mar from an export directory (training.export's output).

The archive holds exactly: the handler, the weights, index_to_name.json, the export's
config.yaml, a model-config.yaml (workers, batching, timeouts, handler limits) and the few
modules of training/ and handler/ that serving imports - nothing else from the repo.

The model name is derived from the export's architecture (`<arch>_cars`); asking for another
architecture's name is refused.

    python scripts/build_mar.py --export models/efficientnet_lite0_cars --version 1.0
    python scripts/build_mar.py --export exports/resnet50_cars --version 2.0 --batch_size 8
    python scripts/build_mar.py --registered efficientnet_lite0_cars@production   # from the MLflow registry
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.fast_path import BACKENDS, PRECISIONS, int8_model_path  # noqa: E402
from handler.image_input import Limits  # noqa: E402
from training import config as config_lib  # noqa: E402

SERVING_MODULES = {
    "training": ["__init__.py", "config.py", "presets.py", "model.py"],
    "handler": ["__init__.py", "batch.py", "fast_path.py", "image_input.py", "model.py"],
}
DEFAULT_EXPORT = ROOT / "models" / "efficientnet_lite0_cars"
DEFAULT_VERSION = "1.0"


class BuildError(RuntimeError):
    pass


def archive_name(model_name: str, version: str) -> str:
    return f"{model_name}_v{version}.mar"


def model_config(args) -> dict:
    """model-config.yaml: TorchServe's per-model settings plus our handler's own section."""
    return {
        "minWorkers": args.workers,
        "maxWorkers": args.workers,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": args.response_timeout,
        "handler": {
            "topk": args.topk,
            "max_bytes": args.max_bytes,
            "max_pixels": args.max_pixels,
            "backend": args.backend,
            "precision": args.precision,
            "threads": args.threads,
        },
    }


def stage(export: Path, args, tmp: Path) -> tuple[Path, Path]:
    """Copy what the archive needs into a staging folder; returns (extra-files dir, model-config)."""
    extra = tmp / "extra"
    for package, files in SERVING_MODULES.items():
        (extra / package).mkdir(parents=True)
        for name in files:
            shutil.copy2(ROOT / package / name, extra / package / name)
    for name in ("index_to_name.json", "config.yaml"):
        shutil.copy2(export / name, extra / name)
    int8 = int8_model_path(export, config_lib.load(export / "config.yaml").model_name)
    if args.precision in ("auto", "int8") and int8.is_file():  # the calibrated int8 model (training.quantize)
        for path in (int8, int8.with_suffix(".bin")):
            shutil.copy2(path, extra / path.name)
    elif args.precision == "int8":
        raise BuildError(f"--precision int8 needs {int8}: run python -m training.quantize --export {export}")
    model_config_path = tmp / "model-config.yaml"
    model_config_path.write_text(yaml.safe_dump(model_config(args), sort_keys=False))
    return extra, model_config_path


def check_export(export: Path, model_name: str | None) -> tuple[str, Path]:
    if not export.is_dir():
        raise BuildError(f"export directory not found: {export} (run training.export first)")
    for name in ("index_to_name.json", "config.yaml"):
        if not (export / name).is_file():
            raise BuildError(f"{export / name} missing: not a training.export directory")
    cfg = config_lib.load(export / "config.yaml")
    expected = cfg.model_name
    if model_name and model_name != expected:
        raise BuildError(f"{export} holds a {cfg.arch} model, which is served as {expected!r}, not {model_name!r}")
    weights = export / f"{expected}.pth"
    if not weights.is_file():
        raise BuildError(f"weights not found: {weights}")
    check_weights(weights)
    return expected, weights


def check_weights(weights: Path) -> None:
    """Archive tensors only: a .pth that needs full unpickling could carry code, and the worker
    (weights_only=True) would refuse it at load anyway. Fail here, not on the server."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError for a corrupt zip, ...
        raise BuildError(f"{weights} is not a plain state_dict ({type(err).__name__}): refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BuildError(f"{weights} is not a state_dict of tensors: refused")


def build(args) -> Path:
    if args.registered:  # the export folder registered by training.register, fetched from MLflow
        with tempfile.TemporaryDirectory() as tmp:
            export = download_registered(args, Path(tmp))
            return build_from(export, args)
    return build_from(Path(args.export).resolve(), args)


def download_registered(args, dest: Path) -> Path:
    from training import tracking

    try:
        export, version = tracking.download_registered(args.registered, dest)
    except tracking.TrackingError as err:
        raise BuildError(str(err)) from err
    args.version = args.version or f"{version}.0"  # registry version 3 -> archive 3.0
    return export


def build_from(export: Path, args) -> Path:
    args.version = args.version or DEFAULT_VERSION
    model_name, weights = check_export(export, args.model_name)
    store = Path(args.model_store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    target = store / archive_name(model_name, args.version)
    if target.exists() and not args.force:
        raise BuildError(f"{target} exists (use --force to rebuild)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extra, model_config_path = stage(export, args, tmp)
        cmd = [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name",
            model_name,
            "--version",
            args.version,
            "--model-file",
            str(ROOT / "handler" / "model.py"),
            "--serialized-file",
            str(weights),
            "--handler",
            str(ROOT / "handler" / "car_classifier.py"),
            "--extra-files",
            str(extra),
            "--config-file",
            str(model_config_path),
            "--export-path",
            str(tmp),
            "--force",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"torch-model-archiver failed:\n{result.stdout}{result.stderr}")
        shutil.move(tmp / f"{model_name}.mar", target)
    return target


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--export", default=str(DEFAULT_EXPORT), help="training.export output directory")
    source.add_argument(
        "--registered", help="NAME@ALIAS or NAME/VERSION from the MLflow registry (training.register) instead"
    )
    p.add_argument(
        "--version", help=f"model version recorded in the archive (default {DEFAULT_VERSION}; the registry's version)"
    )
    p.add_argument("--model_name", help="checked against the export's architecture (default: <arch>_cars)")
    p.add_argument("--model_store", default=str(ROOT / "model_store"))
    p.add_argument("--workers", type=int, default=1)
    # Chosen by bench/run.py sweeps (bench/README.md, "Tuning"): batch 8 with 5 ms gives the most img/s
    # under load short of adding latency to a lone request; 2 workers x 1 thread was slower on 2 cores.
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batch_delay", type=int, default=5, help="ms to wait to fill a batch")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (0 = all cores)")
    p.add_argument("--response_timeout", type=int, default=60, help="s before TorchServe gives up on a worker")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--max_bytes", type=int, default=Limits.max_bytes)
    p.add_argument("--max_pixels", type=int, default=40_000_000)
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto = OpenVINO when installed")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto = int8 when the export has the calibrated int8 model, else bf16 when the CPU has it",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing archive")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = build(args)
    except (BuildError, config_lib.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"built {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
