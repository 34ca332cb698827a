"""The fixtures (shared helpers are in helpers.py): real data from ../shared, real exports made by
the training pipeline, real .mar archives made by build-mar, real TorchServe processes on free ports,
real car photos.

One TorchServe per profile serves the whole session (`server`: both models, default profile;
`hardened_server`); a module starts its own only where its tests change what a server serves or how
it runs (versions, restarts, kills, broken archives, the KServe layout, the container, `serve` itself).

Two marks choose what runs:
    slow    the training stages, Ray, the soak-sized load: skipped unless `--slow` (CI runs with it)
    server  starts or talks to a TorchServe (set here from the fixtures a test uses, or by its module);
            `make check` runs the rest: `pytest -m "not server"`
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DEFAULT_EXPORT, SHARED_CARS, python, smoke_train, start_server
from PIL import Image

from serving.torchserve import free_port

SERVER_FIXTURES = {"server", "hardened_server", "model_store"}  # a test using one of these needs TorchServe


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (training stages, Ray, soak)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def slow(request) -> bool:
    """Whether this run includes the slow paths (`--slow`)."""
    return request.config.getoption("--slow")


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


def build_archive(export: Path, store: Path) -> None:
    result = python("-m", "serving.archive", "--export", str(export), "--model_store", str(store))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def default_store(tmp_path_factory) -> Path:
    """The shipped default model's archive (v1.0) alone: what the in-process handler tests unpack."""
    store = tmp_path_factory.mktemp("model_store")
    build_archive(DEFAULT_EXPORT, store)
    return store


@pytest.fixture(scope="session")
def model_store(default_store, resnet50_export) -> Path:
    """Archives of the shipped default model (v1.0) and the ResNet-50 smoke export (v1.0)."""
    build_archive(resnet50_export, default_store)
    return default_store


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
def hardened_server(tmp_path_factory, model_store):
    """One TorchServe with the hardened profile as shipped (tokens on every API, the model API off), except
    that inference listens on loopback: a test must not expose a server on every interface of its machine."""
    inference = f"http://127.0.0.1:{free_port()}"
    srv = start_server(
        tmp_path_factory.mktemp("hardened"),
        model_store,
        {"efficientnet_lite0_cars": "efficientnet_lite0_cars_v1.0.mar"},
        profile="hardened",
        overrides={"inference_address": inference},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def no_car_pictures(tmp_path_factory) -> dict[str, Path]:
    """Pictures without a car from the no-car test set (training/nocar.py), as JPEG files: {name: path}."""
    from training.nocar import test_pictures

    folder = tmp_path_factory.mktemp("no_car")
    wanted = ("skimage:cat", "sklearn:china.jpg", "skimage:horse", "skimage:rocket", "sklearn:flower.jpg")
    paths = {}
    for name, picture in test_pictures():
        if name in wanted:
            paths[name] = folder / f"{name.split(':')[1].removesuffix('.jpg')}.jpg"
            picture.save(paths[name], quality=92)
    return paths


@pytest.fixture(scope="session")
def street(car_images, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """A 1280x800 JPEG of three cars side by side (crops of three classes, 300-400 px wide) on a picture a
    Python package ships (never trained on), and their boxes: what people send of a car park."""
    from training.nocar import test_pictures

    background = dict(test_pictures())["skimage:gravel"].convert("RGB").resize((1280, 800))
    boxes = []
    for index, path in enumerate(list(car_images.values())[1:4]):
        with Image.open(path) as crop:
            width = 400 - 50 * index
            car = crop.convert("RGB").resize((width, round(width * crop.height / crop.width)), Image.Resampling.LANCZOS)
        x, y = 20 + 420 * index, 760 - car.height - 60 * (index % 2)
        background.paste(car, (x, y))
        boxes.append([x, y, x + car.width, y + car.height])
    path = tmp_path_factory.mktemp("street") / "street.jpg"
    background.save(path, quality=90)
    return path, boxes
