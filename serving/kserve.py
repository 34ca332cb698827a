"""Assemble the storage folder KServe's TorchServe runtime mounts at /mnt/models:

    <out>/config/config.properties   config.properties + the KServe overlay (serving.torchserve.KSERVE)
                                     + this archive's envelope and model snapshot
    <out>/model-store/<model>.mar    copied from model_store/, named after the model alone

Run from the checkout (or with $CAR_CLASSIFIER_HOME set to it): the base is the project's config.properties.

    python -m serving.kserve                                          # v2, the default .mar
    python -m serving.kserve --protocol v1 --archive model_store/resnet50_cars_v2.0.mar
    aws s3 sync var/kserve/v2 s3://your-bucket/car-classifier/v2      # then kubectl apply -f ...

The protocol picks TorchServe's request envelope (v1: `kserve`, v2: `kservev2`); the model's
workers and timeout come from the .mar's own model-config.yaml, as with `make serve`, but not its
batching: the envelopes handle one request per batch (send several inputs per request instead).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from carmodel import paths
from carmodel.errors import exit_with
from serving.torchserve import KSERVE, ServeError, overlaid

ENVELOPES = {"v1": "kserve", "v2": "kservev2"}


class AssembleError(RuntimeError):
    pass


def read_manifest(archive: Path) -> tuple[dict, dict]:
    """The archive's MANIFEST.json and model-config.yaml (built by build-mar)."""
    try:
        with zipfile.ZipFile(archive) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            name = manifest["model"].get("configFile")
            model_config = yaml.safe_load(mar.read(name)) if name else {}
    except (OSError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise AssembleError(f"{archive} is not a readable .mar: {err}") from err
    return manifest, model_config or {}


def store_name(manifest: dict) -> str:
    """The archive's name in the layout: `<model>.mar`. KServe's wrapper only counts a model store
    file whose suffixes are exactly ['.mar'], so `<model>_v1.0.mar` (['.0', '.mar']) would leave the
    pod without a model (ModelMissingError, a crash loop); the version lives in the snapshot."""
    return f"{manifest['model']['modelName']}.mar"


def snapshot(manifest: dict, model_config: dict) -> str:
    """TorchServe's model_snapshot: load the archive at start-up, with its own worker settings."""
    model = manifest["model"]
    entry = {
        "defaultVersion": True,
        "marName": store_name(manifest),
        "minWorkers": model_config.get("minWorkers", 1),
        "maxWorkers": model_config.get("maxWorkers", 1),
        # TorchServe's KServe envelopes read only the first request of a batch: one request per
        # batch, and a client batches by sending several inputs (instances) in one request.
        "batchSize": 1,
        "maxBatchDelay": 0,
        "responseTimeout": model_config.get("responseTimeout", 120),
    }
    models = {model["modelName"]: {model.get("modelVersion", "1.0"): entry}}
    return json.dumps({"name": "startup.cfg", "modelCount": 1, "models": models}, separators=(",", ":"))


def render_config(protocol: str, model_snapshot: str) -> str:
    """The pod's config.properties: the project's base, the KServe overlay, this archive's envelope and snapshot."""
    props = {**overlaid(KSERVE), "service_envelope": ENVELOPES[protocol], "model_snapshot": model_snapshot}
    header = "# KServe's TorchServe runtime: config.properties + serving.torchserve.KSERVE (make kserve)\n"
    return header + "".join(f"{key}={value}\n" for key, value in props.items())


def assemble(archive: Path, out: Path, protocol: str = "v2") -> Path:
    """Writes the layout into `out`; returns the archive's path there."""
    if protocol not in ENVELOPES:
        raise AssembleError(f"protocol must be one of {sorted(ENVELOPES)}, got {protocol!r}")
    if not archive.is_file():
        raise AssembleError(f"archive not found: {archive} (build it: make archive)")
    manifest, model_config = read_manifest(archive)
    try:
        config = render_config(protocol, snapshot(manifest, model_config))
    except ServeError as err:
        raise AssembleError(str(err)) from err
    shutil.rmtree(out / "model-store", ignore_errors=True)
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "model-store").mkdir(parents=True)
    stored = out / "model-store" / store_name(manifest)
    shutil.copy(archive, stored)
    (out / "config" / "config.properties").write_text(config)
    return stored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--archive", type=Path, default=paths.model_store() / paths.DEFAULT_ARCHIVE, help="a .mar built by build-mar"
    )
    parser.add_argument("--protocol", default="v2", choices=sorted(ENVELOPES))
    parser.add_argument("--out", type=Path, help="default: var/kserve/<protocol>")
    args = parser.parse_args(argv)
    out = args.out or paths.var_dir() / "kserve" / args.protocol
    try:
        stored = assemble(args.archive, out, args.protocol)
    except AssembleError as err:
        return exit_with(err)
    print(f"KServe storage for {args.protocol} in {out}: config/config.properties, model-store/{stored.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
