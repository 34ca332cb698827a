"""carmodel/runners.py: the compiled CPU path computes what the fp32 torch model computes: the
logits at the eval size with the car check's logit, and the box of the shipped model (it has a box
head) at its locate size.

Agreement is checked on real car photos with the shipped model; the held-out accuracy of both
paths is measured by bench/parity.py (too slow for the suite on 2 cores).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DEFAULT_EXPORT
from PIL import Image

from carmodel.export import ExportDir
from carmodel.presets import eval_preset, locate_preset
from carmodel.runners import make_runner, torch_runner

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def shipped():
    export = ExportDir(DEFAULT_EXPORT)
    return export.model_config, export.load_model("cpu")


@pytest.fixture(scope="module")
def photos(shipped, cars_root) -> torch.Tensor:
    cfg, _ = shipped
    files = sorted((cars_root / "train").glob("*/*.jpg"))[::200]
    return torch.stack([eval_preset(cfg)(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def reference(shipped, photos) -> torch.Tensor:
    """The fp32 torch model's logits."""
    return torch_runner(shipped[1]).run(photos)[0]


@pytest.fixture(scope="module")
def whole_photos(shipped, cars_root) -> torch.Tensor:
    """Uncropped photos at the locate size: what the box is found on."""
    cfg, _ = shipped
    files = sorted((cars_root / "photos").glob("*/*.jpg"))[::400]
    return torch.stack([locate_preset(cfg)(Image.open(f).convert("RGB")) for f in files])


def test_torch_backend_is_the_eager_model(shipped, photos, reference):
    with torch.no_grad():
        logits, boxes, cars = shipped[1](photos)  # the classes, the box, the car check
    assert torch.allclose(logits, reference, atol=1e-5)
    run = torch_runner(shipped[1]).run(photos)
    assert torch.allclose(run[1], boxes, atol=1e-5) and torch.allclose(run[2], cars, atol=1e-5)


def test_openvino_fp32_matches_torch(shipped, photos, reference, whole_photos):
    runner = make_runner(shipped[1], shipped[0].eval_size, "openvino", "fp32")
    assert (runner.backend, runner.precision) == ("openvino", "fp32")
    compiled = runner.run(photos)
    assert torch.allclose(compiled[0], reference, atol=1e-3, rtol=1e-3)
    assert torch.allclose(compiled[2], torch_runner(shipped[1]).run(photos)[2], atol=1e-3, rtol=1e-3)
    locator = make_runner(shipped[1], shipped[0].locate_size, "openvino", "fp32")
    boxes = torch_runner(shipped[1]).run(whole_photos)[1]
    assert torch.allclose(locator.run(whole_photos)[1], boxes, atol=1e-3)


def test_default_fast_path_agrees_on_the_top1_class(shipped, photos, reference):
    runner = make_runner(shipped[1], shipped[0].eval_size)
    assert runner.backend == "openvino"
    logits = runner.run(photos)[0]
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.95, f"top-1 agrees on {agree:.0%} of {len(photos)} photos ({runner.precision})"
    # the probabilities a user sees stay close too
    assert (logits.softmax(1) - reference.softmax(1)).abs().max() < 0.1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_any_batch_size_is_served(shipped, photos, reference, batch):
    runner = make_runner(shipped[1], shipped[0].eval_size)
    logits, boxes, cars = runner.run(photos[:batch])
    assert logits.shape == (batch, 196) and boxes.shape == (batch, 4) and cars.shape == (batch,)


def test_unknown_settings_are_refused(shipped):
    with pytest.raises(ValueError, match="backend must be one of"):
        make_runner(shipped[1], 224, "tensorrt")


# ---------------------------------------------------------------------------- int8 (training.quantize)


INT8 = ExportDir(DEFAULT_EXPORT).int8_xml


def test_shipped_int8_model_agrees_with_fp32(shipped, photos, reference):
    cfg, model = shipped
    assert INT8.is_file() and INT8.with_suffix(".bin").is_file(), "the export ships its calibrated int8 model"
    runner = make_runner(model, cfg.eval_size, int8_model=INT8)
    assert (runner.backend, runner.precision) == ("openvino", "int8")  # auto picks int8 when it is there
    logits, _, cars = runner.run(photos)
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.9, agree
    assert (torch.sigmoid(cars) > 0.5).float().mean() >= 0.95  # the car check, in int8, still sees these cars
    quantization = json.loads((DEFAULT_EXPORT / "quantization.json").read_text())
    assert quantization["calibration_split"] == "train"
    for view in ("", "_photos"):  # the crops, and the whole photos through the whole chain
        assert quantization[f"top1_fp32{view}"] - quantization[f"top1_int8{view}"] <= 0.005


def test_shipped_int8_model_finds_the_car_where_fp32_does(shipped, whole_photos):
    """The int8 model was calibrated at the eval size; reshaped to the locate size it still finds the car."""
    cfg, model = shipped
    locator = make_runner(model, cfg.locate_size, int8_model=INT8)
    assert locator.precision == "int8"
    difference = (locator.run(whole_photos)[1] - torch_runner(model).run(whole_photos)[1]).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.1, difference


def test_int8_without_the_calibrated_model_is_a_clear_error(shipped, tmp_path):
    cfg, model = shipped
    with pytest.raises(FileNotFoundError, match="training.quantize"):
        make_runner(model, cfg.eval_size, "openvino", "int8", tmp_path / "missing_int8.xml")


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_threads_per_worker_change_speed_not_results(shipped, photos, reference, backend):
    cfg, model = shipped
    threads_before = torch.get_num_threads()
    try:
        runner = make_runner(model, cfg.eval_size, backend, "fp32", threads=1)
        assert torch.allclose(runner.run(photos)[0], reference, atol=1e-3, rtol=1e-3)
        if backend == "torch":
            assert torch.get_num_threads() == 1  # several workers on few cores: one thread each
    finally:
        torch.set_num_threads(threads_before)
