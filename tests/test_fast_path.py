"""handler/fast_path.py: the compiled CPU path computes what the fp32 torch model computes.

Agreement is checked on real car photos with the shipped model; the held-out accuracy of both
paths is measured by bench/parity.py (too slow for the suite on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEFAULT_EXPORT
from PIL import Image

from handler.fast_path import make_runner, torch_runner
from handler.model import load_model
from training import config as config_lib
from training.presets import eval_preset

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def shipped():
    cfg = config_lib.load(DEFAULT_EXPORT / "config.yaml")
    return cfg, load_model(DEFAULT_EXPORT, DEFAULT_EXPORT / "efficientnet_lite0_cars.pth", "cpu")


@pytest.fixture(scope="module")
def photos(shipped, cars_root) -> torch.Tensor:
    cfg, _ = shipped
    files = sorted((cars_root / "train").glob("*/*.jpg"))[::200]
    return torch.stack([eval_preset(cfg)(Image.open(f).convert("RGB")) for f in files])


@pytest.fixture(scope="module")
def reference(shipped, photos) -> torch.Tensor:
    return torch_runner(shipped[1]).run(photos)


def test_torch_backend_is_the_eager_model(shipped, photos, reference):
    with torch.no_grad():
        assert torch.allclose(shipped[1](photos), reference, atol=1e-5)


def test_openvino_fp32_matches_torch(shipped, photos, reference):
    runner = make_runner(shipped[1], shipped[0].eval_size, "openvino", "fp32")
    assert (runner.backend, runner.precision) == ("openvino", "fp32")
    assert torch.allclose(runner.run(photos), reference, atol=1e-3, rtol=1e-3)


def test_default_fast_path_agrees_on_the_top1_class(shipped, photos, reference):
    runner = make_runner(shipped[1], shipped[0].eval_size)
    assert runner.backend == "openvino"
    logits = runner.run(photos)
    agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.95, f"top-1 agrees on {agree:.0%} of {len(photos)} photos ({runner.precision})"
    # the probabilities a user sees stay close too
    assert (logits.softmax(1) - reference.softmax(1)).abs().max() < 0.1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_any_batch_size_is_served(shipped, photos, reference, batch):
    runner = make_runner(shipped[1], shipped[0].eval_size)
    assert runner.run(photos[:batch]).shape == (batch, 196)


def test_unknown_settings_are_refused(shipped):
    with pytest.raises(ValueError, match="backend must be one of"):
        make_runner(shipped[1], 224, "tensorrt")
