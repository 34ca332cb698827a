"""Shared fixtures: real data from ../shared, real exports made by the training pipeline,
real .mar archives made by build-mar (serving/archive.py), real TorchServe processes on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.torchserve import Server, free_ports

ROOT = Path(__file__).resolve().parent.parent

SHARED_CARS = (ROOT / ".." / "shared" / "stanford_cars").resolve()
DEFAULT_EXPORT = ROOT / "models" / "efficientnet_lite0_cars"


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Everything the tests train, evaluate or register is tracked in a store of their own, never in mlruns/."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by the training subprocesses
    return uri


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kwargs)


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([sys.executable, *args], **kwargs)


@pytest.fixture(scope="session")
def cars_root() -> Path:
    if not (SHARED_CARS / "train").is_dir():
        pytest.skip(f"real Stanford Cars images not found at {SHARED_CARS}")
    return SHARED_CARS


@pytest.fixture(scope="session")
def car_images(cars_root) -> dict[str, Path]:
    """One real image for each of a few classes: {official class name: path}."""
    picks = {}
    for folder in sorted((cars_root / "train").iterdir())[::40]:
        picks[folder.name] = sorted(folder.glob("*.jpg"))[0]
    return picks


def smoke_train(out: Path, cars_root: Path, arch: str, **overrides) -> Path:
    """A tiny but complete pipeline run: train -> evaluate -> export. Returns the export dir."""
    args = {
        "arch": arch,
        "data_root": str(cars_root),
        "max_images_per_class": 4,
        "val_fraction": 0.25,
        "test_fraction": 0.25,
        "epochs": 1,
        "train_size": 64,
        "eval_size": 64,
        "batch_size": 32,
        "progress": "false",
        "output_dir": str(out / "run"),
        "unfreeze": 1,
        **overrides,
    }
    flags = [x for k, v in args.items() for x in (f"--{k}", str(v))]
    result = python("-m", "training.train", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    export = out / "export"
    result = python("-m", "training.export", "--run", str(out / "run"), "--export_dir", str(export))
    assert result.returncode == 0, result.stderr[-3000:]
    return export


@pytest.fixture(scope="session")
def resnet50_export(tmp_path_factory, cars_root) -> Path:
    """ResNet-50 through the real pipeline (random init: ImageNet weights are not reachable here)."""
    return smoke_train(tmp_path_factory.mktemp("resnet50"), cars_root, "resnet50", pretrained="none")


@pytest.fixture(scope="session")
def model_store(tmp_path_factory, resnet50_export) -> Path:
    """Archives of the shipped default model (v1.0) and the ResNet-50 smoke export (v1.0)."""
    store = tmp_path_factory.mktemp("model_store")
    for export in (DEFAULT_EXPORT, resnet50_export):
        result = python("-m", "serving.archive", "--export", str(export), "--model_store", str(store))
        assert result.returncode == 0, result.stderr
    return store


def start_server(run_dir: Path, store: Path, models: dict[str, str], **kwargs) -> Server:
    server = Server(run_dir=run_dir, model_store=store, ports=free_ports(), **kwargs)
    try:
        server.start(models, restore=False)
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_store):
    """One TorchServe (default profile) serving both models, shared by the read-only tests."""
    srv = start_server(
        tmp_path_factory.mktemp("ts"),
        model_store,
        {"efficientnet_lite0_cars": "efficientnet_lite0_cars_v1.0.mar", "resnet50_cars": "resnet50_cars_v1.0.mar"},
    )
    yield srv
    srv.stop()
