"""carmodel's export contract and inference chain, in-process, on the shipped model and real photos."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import DEFAULT_EXPORT
from PIL import Image

from carmodel.config import ModelConfig
from carmodel.detection import Decoder, Letterbox
from carmodel.export import ExportDir, ExportError
from carmodel.models import DetectPass, build_model
from carmodel.predictor import Predictor, prominence, to_pixels
from carmodel.presets import cut_out, eval_preset

MODEL = "efficientnet_lite0_cars"


@pytest.fixture(scope="module")
def reference() -> Predictor:
    return Predictor.for_export(ExportDir(DEFAULT_EXPORT), backend="torch")


@pytest.fixture(scope="module")
def photos(car_images) -> list[Image.Image]:
    """Crops: the car is all of the image."""
    return [Image.open(path).convert("RGB") for path in list(car_images.values())[:4]]


@pytest.fixture(scope="module")
def whole_photos(car_images, cars_root) -> list[Image.Image]:
    """The same cars uncropped."""
    return [
        Image.open(cars_root / "photos" / p.parent.name / p.name).convert("RGB") for p in list(car_images.values())[:4]
    ]


# ---------------------------------------------------------------------------- ExportDir


def test_the_shipped_export_follows_the_contract():
    export = ExportDir(DEFAULT_EXPORT)
    export.validate(MODEL)
    assert export.model_name == MODEL and export.weights.name == f"{MODEL}.pth"
    assert export.has_int8 and [p.name for p in export.int8_files] == [f"{MODEL}_int8.xml", f"{MODEL}_int8.bin"]
    assert export.has_detector_int8
    assert {p.name for p in export.serving_files()} == {
        "model.yaml",
        "index_to_name.json",
        "calibration.json",
        f"{MODEL}.pth",
        f"{MODEL}_int8.xml",
        f"{MODEL}_int8.bin",
        f"{MODEL}_detector_int8.xml",
        f"{MODEL}_detector_int8.bin",
    }
    assert len(export.classes()) == 196 and export.classes()[0] == "AM General Hummer SUV 2000"


def test_export_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        ExportDir(tmp_path / "nope").validate()
    with pytest.raises(ExportError, match="model.yaml missing"):
        ExportDir(tmp_path).validate()
    shutil.copy(DEFAULT_EXPORT / "model.yaml", tmp_path / "model.yaml")
    with pytest.raises(ExportError, match="served as 'efficientnet_lite0_cars', not 'resnet50_cars'"):
        ExportDir(tmp_path).validate("resnet50_cars")
    with pytest.raises(ExportError, match="index_to_name.json missing"):
        ExportDir(tmp_path).validate()
    (tmp_path / "model.yaml").write_text("arch: efficientnet_lite0\nlearning_rate: 0.1\n")
    with pytest.raises(ExportError, match="unknown settings: learning_rate"):
        ExportDir(tmp_path).validate()


def test_save_then_load_gives_the_same_network(tmp_path):
    config = ModelConfig(arch="mobilenet_v2", dropout=0.0, eval_size=64)
    model, _ = build_model(config.arch, 3, "none", config.dropout)
    export = ExportDir(tmp_path / "export")
    export.save(model.eval(), ["a", "b", "c"], config)
    assert export.model_config == config and export.classes() == ["a", "b", "c"]
    assert export.weights.name == "mobilenet_v2_cars.pth" and not export.has_int8
    export.validate()
    inputs = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(export.load_model()(inputs), model(inputs))


def test_a_model_with_a_box_head_saves_and_loads_with_its_box_head(tmp_path):
    config = ModelConfig(arch="mobilenet_v2", dropout=0.0, eval_size=64, locate_size=32)
    model, _ = build_model(config.arch, 3, "none", config.dropout, locate=True)
    export = ExportDir(tmp_path / "export")
    export.save(model.eval(), ["a", "b", "c"], config)
    assert ExportDir(export.path).model_config.localizes
    inputs = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for loaded, saved in zip(export.load_model()(inputs), model(inputs), strict=True):
            assert torch.equal(loaded, saved)
    # its classifier's weights alone start a new model with a box head (stage 2 of the shipped recipe)
    torch.save(model.net.state_dict(), tmp_path / "classifier.pth")
    again, init = build_model(config.arch, 3, str(tmp_path / "classifier.pth"), config.dropout, locate=True)
    assert init.startswith("file:") and torch.equal(again.net.classifier[1].weight, model.net.classifier[1].weight)


# ---------------------------------------------------------------------------- Predictor


def test_predictor_finds_the_car_then_classifies_it_cut_from_the_full_image(reference, whole_photos):
    """The chain by hand: the whole photo letterboxed into the detector's canvas gives the candidates (FCOS's
    decoding); each one scoring at least the detect threshold is cut from the full image at its box in whole
    pixels (widened by the margin) and squashed to the eval size; the classifier's pass gives its classes and,
    with the car check, the car logit: the car score sqrt(detector x car check). The most prominent candidate
    (area x car score) reaching the car threshold gives the softmax the predictor answers with."""
    export = ExportDir(DEFAULT_EXPORT)
    config, model = export.model_config, export.load_model()
    calibration = reference.calibration
    assert config.detects
    canvas, decoder = Letterbox(config), Decoder(model.detector, config)
    with torch.no_grad():
        tensors, scales = zip(*(canvas(p) for p in whole_photos), strict=True)
        found = decoder.cars(DetectPass(model)(torch.stack(tensors)), [canvas.content(p.size) for p in whole_photos])
        answers = []
        for image, candidates, scale in zip(whole_photos, found, scales, strict=True):
            kept = candidates.scores >= calibration.candidate_threshold
            boxes = [[round(v) for v in (box / scale).tolist()] for box in candidates.boxes[kept]]
            cuts = [eval_preset(config)(cut_out(image, box, (config.crop_margin,) * 4)) for box in boxes]
            outputs = model(torch.stack(cuts))
            scores = candidates.scores[kept]
            if config.car_head:
                scores = (scores * torch.sigmoid(outputs[2])).sqrt()
            areas = torch.tensor([(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes]) * scores
            best = int(torch.where(scores >= calibration.car_threshold, areas, -1.0).argmax())
            answers.append((boxes[best], outputs[0][best].softmax(0)))
    forward = reference.run([reference.prepare(p) for p in whole_photos])
    by_chain = reference.top_k(forward.logits.softmax(1), 1)
    assert (forward.car_scores >= calibration.car_threshold).all()  # a car in every one of these photos
    for (expected, row), box, answer in zip(answers, forward.boxes, by_chain, strict=True):
        assert box == pytest.approx(expected, abs=1)  # whole pixels of the uploaded image
        assert answer[0].class_id == int(row.argmax())
        assert answer[0].probability == pytest.approx(float(row.max()), abs=0.02)


def test_a_crop_like_input_is_found_to_fill_the_frame(reference, photos):
    """Crops (the car is the whole image) must not get worse: the box found is nearly all of it."""
    forward = reference.run([reference.prepare(p) for p in photos])
    for image, (x1, y1, x2, y2) in zip(photos, forward.boxes, strict=True):
        assert (x2 - x1) * (y2 - y1) >= 0.7 * image.width * image.height, ((x1, y1, x2, y2), image.size)


def test_flip_answers_a_car_and_its_mirror_image_alike_with_both_answers_averaged(reference, photos):
    """With `flip`, the classify pass runs each car and its mirror image and averages their logits (the car
    check's too): the mean of the two answers without it, and the same answer for the mirrored car."""
    flipped = copy.copy(reference)
    flipped.flip = True
    batch = torch.stack([reference.preprocess(p) for p in photos])
    logits, car_logits = reference.classify(batch)
    mirror_logits, mirror_car_logits = reference.classify(batch.flip(-1))
    both, both_car = flipped.classify(batch)
    assert both == pytest.approx((logits + mirror_logits) / 2, abs=1e-4)
    assert both_car == pytest.approx((car_logits + mirror_car_logits) / 2, abs=1e-4)
    assert flipped.classify(batch.flip(-1))[0] == pytest.approx(both, abs=1e-4)
    assert not torch.allclose(logits, mirror_logits, atol=1e-2)  # the mirror image is a different input


def test_the_cars_come_first_most_prominent_first_then_the_candidates_turned_down():
    boxes = [(0, 0, 10, 10), (0, 0, 20, 20), (0, 0, 100, 100), (0, 0, 5, 5), (0, 0, 50, 50)]
    scores = [0.9, 0.6, 0.3, 0.8, 0.2]  # the large boxes of rows 2 and 4 are turned down at 0.5
    assert prominence([0, 0, 0, 1, 1], boxes, scores, threshold=0.5) == [[1, 0, 2], [3, 4]]
    assert prominence([0, 0, 0], boxes[:3], scores[:3], threshold=0.0) == [[2, 1, 0]]  # area x score only


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((0.1, 0.2, 0.6, 0.9), (10, 10, 60, 45)),
        ((0.6, 0.9, 0.1, 0.2), (10, 10, 60, 45)),  # corners swapped: ordered
        ((-0.5, -0.1, 1.4, 2.0), (0, 0, 100, 50)),  # outside: clamped to the image
    ],
)
def test_box_fractions_become_ordered_pixels_inside_the_image(box, expected):
    assert to_pixels(torch.tensor(box), (100, 50)) == expected


def test_top_k_per_row_best_first_and_capped_at_the_classes(reference, photos):
    logits = reference.logits([reference.preprocess(p) for p in photos[:3]])
    answers = reference.top_k(logits.softmax(1), [1, 5, 500])
    assert [len(a) for a in answers] == [1, 5, 196]
    for answer in answers:
        probabilities = [p.probability for p in answer]
        assert probabilities == sorted(probabilities, reverse=True)
    assert sum(p.probability for p in answers[2]) == pytest.approx(1.0, abs=1e-4)
    assert answers[0][0].to_dict().keys() == {
        "class_id",
        "class_name",
        "probability",
        "make",
        "model",
        "year",
        "body_type",
    }


def test_the_default_predictor_serves_the_int8_model_and_agrees(reference, photos):
    fast = Predictor.for_export(ExportDir(DEFAULT_EXPORT))
    assert fast.engine == "openvino int8" and reference.engine == "torch fp32"
    assert [a.predictions[0].class_id for a in fast.predict(photos, k=1)] == [
        a.predictions[0].class_id for a in reference.predict(photos, k=1)
    ]
