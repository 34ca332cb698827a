"""training/corruptions.py on a real car photo: each condition is what it says, worse at each severity,
the same every time; and `training.evaluate --corruptions` reports them for a real export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import python
from PIL import Image

from training.corruptions import CORRUPTIONS, SEVERITIES, corrupt, mean_relative_top1


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_condition_is_worse_at_each_severity_and_the_same_every_time(name, car_rgb):
    shown = [corrupt(car_rgb, name, severity) for severity in SEVERITIES]
    assert all(image.mode == "RGB" for image in shown)
    assert pixels(corrupt(car_rgb, name, 2)).tobytes() == pixels(shown[1]).tobytes()  # deterministic
    if name == "downscale":
        sides = [max(image.size) for image in shown]
        assert sides == sorted(sides, reverse=True) and sides[-1] < max(car_rgb.size) // 4
        return
    assert all(image.size == car_rgb.size for image in shown)
    clean = pixels(car_rgb)
    away = [float(np.abs(pixels(image) - clean).mean()) for image in shown]
    assert 0 < away[0] < away[1] < away[2], away


def test_the_conditions_do_what_they_say(car_rgb):
    clean = pixels(car_rgb)
    assert pixels(corrupt(car_rgb, "low_light", 2)).mean() < 0.6 * clean.mean()  # darker
    gray = pixels(corrupt(car_rgb, "grayscale", 3))
    assert np.abs(gray - gray.mean(2, keepdims=True)).max() < 2 / 255  # no colour left
    blurred = pixels(corrupt(car_rgb, "blur", 3))
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.5 * np.abs(np.diff(clean, axis=1)).mean()  # fewer edges


def test_unknown_conditions_and_severities_are_refused(car_rgb):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(car_rgb, "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(car_rgb, "blur", 4)


def test_mean_relative_top1_is_over_every_condition_and_severity():
    assert mean_relative_top1({"a": {1: 0.8, 2: 0.6}, "b": {1: 0.4, 2: 0.2}}, clean=0.8) == pytest.approx(0.625)


@pytest.mark.slow
def test_evaluate_reports_every_condition_of_a_real_export(resnet50_export, tmp_path):
    result = python(
        "-m", "training.evaluate", "--export", str(resnet50_export), "--out", str(tmp_path), "--views", "crops"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "corruptions" not in json.loads((tmp_path / "eval_test.json").read_text())  # only when asked
    asked = ("--views", "crops", "--corruptions")
    result = python("-m", "training.evaluate", "--export", str(resnet50_export), "--out", str(tmp_path), *asked)
    assert result.returncode == 0, result.stderr[-2000:]
    corrupted = json.loads((tmp_path / "eval_test.json").read_text())["corruptions"]
    assert set(corrupted["by_corruption"]) == set(CORRUPTIONS)
    for by_severity in corrupted["by_corruption"].values():
        assert list(by_severity) == ["1", "2", "3"]
        assert all(0 <= r["top1"] <= 1 and 0 <= r["ece"] <= 1 for r in by_severity.values())
    assert corrupted["mean_top1_relative"] >= 0
    assert "crops, low_light: 1: top1=" in result.stdout
