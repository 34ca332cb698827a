"""The shipped default model (models/efficientnet_lite0_cars) is a real car classifier.

Checked two ways on photos it never saw in training (the export's own split.json): its recorded
held-out metrics, and predictions over HTTP from TorchServe (`curl -T` path), which must match
the in-process model and get most of the held-out photos right.
"""

from __future__ import annotations

import json

import pytest
import requests
from helpers import DEFAULT_EXPORT
from PIL import Image

from carmodel.export import ExportDir
from carmodel.predictor import Predictor

MODEL = "efficientnet_lite0_cars"
SAMPLE_EVERY = 35  # ~30 held-out photos spread over the classes: enough to tell a real model from chance


@pytest.fixture(scope="module")
def held_out(cars_root) -> list[tuple[str, str]]:
    """[(path relative to the data root, official class name)] from the export's test split."""
    split = json.loads((DEFAULT_EXPORT / "split.json").read_text())
    train = set(split["files"]["train"]) | set(split["files"]["val"])
    test = split["files"]["test"][::SAMPLE_EVERY]
    assert test and not train & set(test)
    classes = json.loads((DEFAULT_EXPORT / "index_to_name.json").read_text())
    by_folder = {name.replace("/", "-"): name for name in classes.values()}
    return [(rel, by_folder[rel.split("/")[1]]) for rel in test]


# The shipped export measured 86.5 % top-1 on its 1,039-photo test split; the target is 85 % (see
# README "The shipped model"). An export below the target must not ship.
SHIPPED_TOP1_FLOOR = 0.85


def test_recorded_held_out_accuracy_is_that_of_a_real_model():
    metrics = json.loads((DEFAULT_EXPORT / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] >= 1000
    assert metrics["top1"] >= SHIPPED_TOP1_FLOOR, metrics["top1"]


def test_served_default_model_gets_held_out_photos_right(server, cars_root, held_out):
    # the same inference chain the handler runs by default, one image at a time like these requests
    local = Predictor.for_export(ExportDir(DEFAULT_EXPORT))
    correct = 0
    for rel, true_name in held_out:
        path = cars_root / rel
        response = requests.put(server.url("inference") + f"/predictions/{MODEL}", data=path.read_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        top = response.json()
        expected = local.predict([Image.open(path).convert("RGB")], k=1)[0][0].class_id
        assert top[0]["class_id"] == expected, rel  # the server runs the same model as training exported
        correct += top[0]["class_name"] == true_name
    assert correct / len(held_out) >= 0.8, f"{correct}/{len(held_out)} held-out photos right"
