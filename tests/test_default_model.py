"""The shipped default model (models/efficientnet_lite0_cars) is a real car classifier, of the
bounding-box crops it trained on and of the whole photos people take.

Checked on cars it never saw in training (the export's own split.json): its recorded held-out
metrics for both views, and predictions over HTTP from TorchServe (`curl -T` path), which must
match the in-process model, get most of the held-out crops and whole photos right, and find the
car in the photo where photos/boxes.csv says it is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import requests
from helpers import DEFAULT_EXPORT, encode, iou
from PIL import Image

from carmodel.export import ExportDir
from carmodel.predictor import Predictor
from training.nocar import test_pictures

MODEL = "efficientnet_lite0_cars"
SAMPLE_EVERY = 35  # ~30 held-out photos spread over the classes: enough to tell a real model from chance
CALIBRATION_EVERY = 10  # ~100: the mean probability's gap to accuracy measured within a few points


def held_out_cars(every: int) -> list[tuple[str, str]]:
    """[(path relative to the data root, official class name)]: every `every`th car of the export's test split."""
    split = json.loads((DEFAULT_EXPORT / "split.json").read_text())
    train = set(split["files"]["train"]) | set(split["files"]["val"])
    test = split["files"]["test"][::every]
    assert test and not train & set(test)
    classes = json.loads((DEFAULT_EXPORT / "index_to_name.json").read_text())
    by_folder = {name.replace("/", "-"): name for name in classes.values()}
    return [(rel, by_folder[rel.split("/")[1]]) for rel in test]


@pytest.fixture(scope="module")
def held_out(cars_root) -> list[tuple[str, str]]:
    return held_out_cars(SAMPLE_EVERY)


# Floors under which an export must not ship, on the 1,039 held-out cars (the model card has the measured
# figures: 87.3 % and 80.7 %; on 300 test composites AP50 0.81, precision 87.1 %, 93.1 % of cars >= 192 px found;
# 97.7 % of the no-car test set answered "no car").
SHIPPED_TOP1_FLOOR = {"crops": 0.86, "photos": 0.79}


def test_recorded_held_out_accuracy_is_that_of_a_real_model():
    metrics = json.loads((DEFAULT_EXPORT / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] >= 1000
    for view, floor in SHIPPED_TOP1_FLOOR.items():
        assert metrics["views"][view]["top1"] >= floor, (view, metrics["views"][view]["top1"])
    assert metrics["views"]["photos"]["box_iou_at_least_0.5"] >= 0.9
    found = metrics["detection"]
    assert found["ap50"] >= 0.78 and found["precision"] >= 0.85 and found["recall_192_up"] >= 0.9, found
    assert metrics["no_car_test_set"]["answered_no_car"] >= 0.9


def whole_photo(cars_root, rel: str):
    """The uncropped photo of the held-out car whose crop is `rel` (train/<class>/<id>.jpg)."""
    return cars_root / "photos" / Path(rel).relative_to("train")


def test_served_default_model_gets_whole_photos_right_and_finds_the_car(server, cars_root, held_out):
    known = {row["id"]: row for row in csv.DictReader((cars_root / "photos" / "boxes.csv").open())}
    correct, fitting, checked = 0, 0, 0
    for rel, true_name in held_out:
        path = whole_photo(cars_root, rel)
        response = requests.put(
            server.url("inference") + f"/predictions/{MODEL}",
            data=path.read_bytes(),
            headers={"X-Box": "true"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"predictions", "box", "boxes"}
        correct += answer["predictions"][0]["class_name"] == true_name
        x1, y1, x2, y2 = answer["box"]
        width, height = Image.open(path).size
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (answer["box"], path)
        row = known[path.stem]
        if float(row["match"]) >= 0.8:  # boxes.csv's trusted boxes
            checked += 1
            fitting += iou(answer["box"], [float(row[k]) for k in ("x1", "y1", "x2", "y2")]) >= 0.5
    assert correct / len(held_out) >= 0.7, f"{correct}/{len(held_out)} held-out whole photos right"
    assert checked >= 20 and fitting / checked >= 0.85, f"box around the car in {fitting}/{checked}"


def test_a_phone_sized_photo_gets_its_box_in_its_own_pixels(server, cars_root, held_out):
    """The box is in the uploaded image's pixels: the same photo 8x larger gets an 8x larger box."""
    path = whole_photo(cars_root, held_out[0][0])
    small = Image.open(path).convert("RGB")
    large = small.resize((small.width * 8, small.height * 8), Image.Resampling.BICUBIC)
    boxes = []
    for image in (small, large):
        response = requests.put(
            server.url("inference") + f"/predictions/{MODEL}",
            data=encode(image, "JPEG", quality=92),
            headers={"X-Box": "1"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        boxes.append(response.json()["box"])
    assert boxes[1] == pytest.approx([8 * v for v in boxes[0]], abs=0.04 * large.width)


def test_served_default_model_gets_held_out_photos_right(server, cars_root, held_out):
    # the same inference chain the handler runs by default, one image at a time like these requests
    local = Predictor.for_export(ExportDir(DEFAULT_EXPORT))
    correct = 0
    for rel, true_name in held_out:
        path = cars_root / rel
        response = requests.put(server.url("inference") + f"/predictions/{MODEL}", data=path.read_bytes(), timeout=60)
        assert response.status_code == 200, response.text
        top = response.json()  # [] for the rare held-out car taken for no car (0.5 % of the crops): wrong
        expected = [p.class_id for p in local.predict([Image.open(path).convert("RGB")], k=1)[0].predictions]
        assert [row["class_id"] for row in top[:1]] == expected, rel  # the server runs the model training exported
        correct += bool(top) and top[0]["class_name"] == true_name
    assert correct / len(held_out) >= 0.8, f"{correct}/{len(held_out)} held-out photos right"


@pytest.mark.parametrize(
    ("fmt", "scale"),
    [("HEIF", 1), ("AVIF", 1), ("JPEG", 8)],  # as an iPhone sends them, and a JPEG at phone resolution
    ids=["heic", "avif", "jpeg-8x"],
)
def test_phone_formats_and_sizes_are_classified_like_the_photo(server, cars_root, held_out, fmt, scale):
    """Real held-out crops re-encoded as a phone would send them get the answer their original gets:
    HEIC and AVIF decode like JPEG, and a large JPEG decoded at a DCT scale sees the same car."""
    same, correct = 0, 0
    for rel, true_name in held_out[:12]:
        original = Image.open(cars_root / rel).convert("RGB")
        phone = original.resize((original.width * scale, original.height * scale), Image.Resampling.BICUBIC)
        answers = []
        for body in (encode(original, "JPEG", quality=95), encode(phone, fmt, quality=90)):
            response = requests.put(server.url("inference") + f"/predictions/{MODEL}", data=body, timeout=60)
            assert response.status_code == 200, response.text
            answers.append(next((row["class_name"] for row in response.json()), None))  # None: "no car"
        same += answers[0] == answers[1]
        correct += answers[1] == true_name
    assert same >= 10 and correct >= 8, f"{fmt} x{scale}: {same}/12 as the original, {correct}/12 right"


def details(server, data: bytes) -> dict:
    response = requests.put(
        server.url("inference") + f"/predictions/{MODEL}", data=data, headers={"X-Details": "true"}, timeout=60
    )
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json", response.text
    return response.json()


@pytest.mark.parametrize("view", ["crops", "photos"])
def test_served_probabilities_say_how_often_the_answer_is_right(server, cars_root, view):
    """Calibrated: over ~100 held-out cars the mean top-1 probability is within a few points of the
    accuracy; (nearly) every car is found, and the answer's make and body type are the top-1 class's when sure."""
    cars = held_out_cars(CALIBRATION_EVERY)
    right, probabilities, missed = [], [], []
    for rel, true_name in cars:
        path = cars_root / rel if view == "crops" else whole_photo(cars_root, rel)
        answer = details(server, path.read_bytes())
        if not answer["car"]["found"]:
            missed.append((rel, answer["car"]["score"]))
            continue
        top1 = answer["predictions"][0]
        right.append(top1["class_name"] == true_name)
        probabilities.append(top1["probability"])
        # a make's or body type's probability is summed over its classes, the top-1's among them
        assert answer["body_type"]["probability"] >= top1["probability"] - 1e-6
        if not answer["uncertain"]:
            assert answer["make"] is not None  # sure of the car, so of its make
        if answer["make"] and top1["probability"] > 0.5:  # then no other make can hold more
            assert answer["make"]["name"] == top1["make"] and answer["make"]["probability"] >= top1["probability"]
    assert len(missed) <= 2, missed  # the car threshold calls under 1 % of held-out cars "no car"
    accuracy, confidence = sum(right) / len(right), sum(probabilities) / len(probabilities)
    assert abs(confidence - accuracy) <= 0.08, (
        f"{view}: mean top-1 probability {confidence:.3f}, accuracy {accuracy:.3f}"
    )


def test_pictures_without_a_car_are_answered_no_car(server):
    """The no-car test set (training/nocar.py: the sample pictures that packages ship, never trained on) through
    the server: the plain answer is [] for at least 90 % of them (the model card: 93 % through the float model,
    the car check turning down the faces and objects the detector takes for cars), and the detailed one of each
    of those says no car, with its score."""
    url = server.url("inference") + f"/predictions/{MODEL}"
    called_cars, pictures = [], 0
    for name, picture in test_pictures():
        pictures += 1
        body = encode(picture, "JPEG", quality=92)
        plain = requests.put(url, data=body, timeout=60)
        assert plain.status_code == 200, (name, plain.text[:300])
        if plain.json():
            called_cars.append(name)
            continue
        answer = details(server, body)
        assert answer["car"]["found"] is False and 0 <= answer["car"]["score"] < 1, (name, answer)
        assert answer["car"]["box"] is None and answer["make"] is None and answer["predictions"] == []
    assert pictures >= 40 and len(called_cars) <= 0.1 * pictures, called_cars
