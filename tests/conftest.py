"""The fixtures (shared helpers are in helpers.py): real data from ../shared, real exports made by
the training pipeline, real .mar archives made by build-mar, real TorchServe processes on free ports,
real car photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DEFAULT_EXPORT, SHARED_CARS, python, smoke_train, start_server
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Everything the tests train, evaluate or register is tracked in a store of their own, never in mlruns/."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by the training subprocesses
    return uri


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


@pytest.fixture(scope="session")
def car_image(car_images) -> Path:
    """The first of them: the photo a test sends when one will do."""
    return next(iter(car_images.values()))


@pytest.fixture(scope="session")
def photos(car_images) -> list[bytes]:
    return [path.read_bytes() for path in car_images.values()]


@pytest.fixture(scope="session")
def photo(car_image) -> bytes:
    return car_image.read_bytes()


@pytest.fixture(scope="session")
def car_rgb(car_image) -> Image.Image:
    with Image.open(car_image) as img:
        return img.convert("RGB")


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


@pytest.fixture(scope="session")
def no_car_pictures(tmp_path_factory) -> dict[str, Path]:
    """Pictures without a car from the no-car test set (training/nocar.py), as JPEG files: {name: path}."""
    from training.nocar import test_pictures

    folder = tmp_path_factory.mktemp("no_car")
    wanted = ("skimage:cat", "skimage:astronaut", "skimage:horse", "skimage:rocket", "sklearn:flower.jpg")
    paths = {}
    for name, picture in test_pictures():
        if name in wanted:
            paths[name] = folder / f"{name.split(':')[1].removesuffix('.jpg')}.jpg"
            picture.save(paths[name], quality=92)
    return paths
