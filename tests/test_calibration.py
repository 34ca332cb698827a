"""carmodel/calibration.py and the training transform's photo conditions, on real car crops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

from carmodel.calibration import QUALITY, Calibration, image_quality
from carmodel.config import IMAGENET_MEAN, IMAGENET_STD
from carmodel.presets import ClassificationPresetEval, ClassificationPresetTrain, photo_conditions
from training import corruptions
from training.calibrate import in_photo_conditions

PRESET = ClassificationPresetEval(size=224)


def quality(image: Image.Image) -> dict[str, float]:
    row = image_quality(PRESET(image).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD)[0]
    return dict(zip(QUALITY, row.tolist(), strict=True))


@pytest.fixture(scope="module")
def crop(car_image) -> Image.Image:
    return Image.open(car_image).convert("RGB")


def test_image_quality_sees_dusk_blur_grain_and_faded_colour(crop):
    clean = quality(crop)
    dark = quality(corruptions.corrupt(crop, "low_light", 2))
    assert dark["brightness"] < clean["brightness"] - 0.3 and dark["contrast"] < clean["contrast"]
    assert quality(crop.filter(ImageFilter.GaussianBlur(4)))["sharpness"] < clean["sharpness"] - 0.3
    assert quality(corruptions.corrupt(crop, "noise", 2))["sharpness"] > clean["sharpness"] + 0.1
    assert quality(crop.convert("L").convert("RGB"))["colour"] < 0.01 < clean["colour"]


def test_the_temperature_rises_as_the_quality_leaves_the_clean_crops(crop):
    reference = image_quality(PRESET(crop).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD)[0]
    calibration = Calibration(
        temperature=0.5,
        quality_mean=tuple(reference.tolist()),
        quality_scale=(0.2,) * 4,
        quality_weights=(0.0,) * 4,
        quality_square_weights=(0.1,) * 4,
    )
    images = [crop, corruptions.corrupt(crop, "low_light", 3), crop.filter(ImageFilter.GaussianBlur(6))]
    batch = torch.stack([PRESET(image) for image in images])
    temperatures = calibration.temperatures(torch.full((3,), 224.0), image_quality(batch, IMAGENET_MEAN, IMAGENET_STD))
    assert temperatures[0] == pytest.approx(0.5, rel=1e-4)
    assert (temperatures[1:] > 0.6).all()
    # without the image's quality (or without quality weights) T depends on the size alone
    assert calibration.temperatures(torch.tensor([224.0])).item() == pytest.approx(0.5)
    assert not Calibration().sees_quality and calibration.sees_quality


def test_a_calibration_file_round_trips_and_refuses_unknown_keys(tmp_path):
    calibration = Calibration(temperature=0.4, quality_mean=(1.0, 2.0), quality_weights=(0.1, 0.2), fitted_on="x")
    calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path / "calibration.json") == calibration
    (tmp_path / "bad.json").write_text('{"temperature": 1.0, "tempreature": 2.0}')
    with pytest.raises(ValueError, match="unknown calibration keys: tempreature"):
        Calibration.load(tmp_path / "bad.json")
    assert Calibration.load(tmp_path / "missing.json") == Calibration()
    assert dataclasses.replace(calibration, sure_threshold=0.9).with_thresholds(sure_threshold=-1).sure_threshold == 0.9


def test_photo_conditions_change_the_image_within_range(crop):
    tensor = F.to_dtype(F.to_image(crop), torch.float32, scale=True)
    conditions = photo_conditions()
    torch.manual_seed(0)
    altered = [conditions(tensor) for _ in range(20)]
    assert all(a.shape == tensor.shape and a.min() >= 0 and a.max() <= 1 for a in altered)
    assert sum(not torch.allclose(a, tensor, atol=0.02) for a in altered) >= 18
    train = ClassificationPresetTrain(crop_size=96, photo_conditions_prob=1.0)
    assert train(crop).shape == (3, 96, 96)


def test_the_calibrations_photo_conditions_shrink_the_car_into_the_sides_asked_and_repeat_from_a_seed(crop):
    """training.calibrate's conditions at the network's scale: each car shrunk (never enlarged) to a longer
    side in the range, then altered; the same seed draws the same pictures."""
    small = crop.resize((150, round(150 * crop.height / crop.width)))
    alter = in_photo_conditions(seed=3, longest_sides=(112, 224))
    shrunk = [alter(crop) for _ in range(6)]
    assert all(112 <= max(image.size) <= 224 for image in shrunk)
    assert len({image.size for image in shrunk}) > 1  # a random side, not one size
    assert max(alter(small).size) <= 150  # never enlarged
    again = in_photo_conditions(seed=3, longest_sides=(112, 224))
    assert [again(crop).tobytes() for _ in range(6)] == [image.tobytes() for image in shrunk]
    assert in_photo_conditions(seed=3)(crop).size == crop.size  # without sides: at the photo's own size
