"""The car detector's geometry and decoding (carmodel/detection.py) and its measures (training/detector.py),
on pictures and outputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from carmodel.config import ModelConfig
from carmodel.detection import Decoder, Found, Letterbox, level_shapes
from carmodel.models import DetectPass, build_model
from carmodel.runners import make_runner
from training.evaluate import average_precision, detection_metrics, matched

CONFIG = ModelConfig(locate_size=128, detect_size=(256, 192))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", 196, locate=True, detector=True)[0].eval()


@pytest.mark.parametrize(
    ("size", "content"),
    [((400, 200), (128, 256)), ((100, 200), (192, 96)), ((640, 480), (192, 256)), ((64, 48), (192, 256))],
)
def test_the_letterbox_keeps_the_aspect_and_pads_with_the_mean(size, content):
    canvas = Letterbox(CONFIG)
    tensor, scale = canvas(Image.new("RGB", size, (255, 255, 255)))
    assert tensor.shape == (3, 192, 256) and canvas.content(size) == content
    assert scale == pytest.approx(min(256 / size[0], 192 / size[1]))
    height, width = content
    assert (tensor[:, :height, :width] > 2).all()  # white, normalised
    assert (tensor[:, height:, :] == 0).all() and (tensor[:, :, width:] == 0).all()  # the mean colour


def one_car_outputs(decoder: Decoder, box: list[float], level: int, place: tuple[int, int]):
    """Outputs that say 'no car' everywhere but at one place of one level, which regresses `box`."""
    shapes = level_shapes(CONFIG.detect_size)
    total = sum(h * w for h, w in shapes)
    logits, centreness = torch.full((1, total, 1), -12.0), torch.full((1, total, 1), -12.0)
    index = sum(h * w for h, w in shapes[:level]) + place[0] * shapes[level][1] + place[1]
    anchors = torch.cat(decoder.anchors)
    regression = torch.zeros(1, total, 4)
    regression[0, index] = decoder.model.box_coder.encode(anchors[index : index + 1], torch.tensor([box]))[0]
    logits[0, index], centreness[0, index] = 12.0, 12.0
    return logits, regression, centreness


def test_a_regressed_box_is_decoded_where_it_was_and_clipped_to_the_picture(model):
    decoder = Decoder(model.detector, CONFIG)
    found = decoder.cars(one_car_outputs(decoder, [40.0, 60.0, 140.0, 110.0], 1, (5, 5)), [(192, 256)])[0]
    assert found.boxes.tolist() == [pytest.approx([40.0, 60.0, 140.0, 110.0], abs=1e-3)]
    assert float(found.scores[0]) == pytest.approx(1.0, abs=1e-4)
    # a 256x96 picture (content 96 px high): the box's part below it is cut off
    found = decoder.cars(one_car_outputs(decoder, [40.0, 60.0, 140.0, 150.0], 1, (5, 5)), [(96, 256)])[0]
    assert found.boxes.tolist() == [pytest.approx([40.0, 60.0, 140.0, 96.0], abs=1e-3)]


def test_nothing_is_found_where_every_place_says_no_car(model):
    decoder = Decoder(model.detector, CONFIG)
    logits, regression, centreness = one_car_outputs(decoder, [0.0, 0.0, 10.0, 10.0], 0, (0, 0))
    logits[:] = -12.0
    assert len(decoder.cars((logits, regression, centreness), [(192, 256)])[0].boxes) == 0


def test_a_batch_is_decoded_as_each_picture_alone_and_as_fcos_decodes_it(model):
    """The decoder's batched decoding gives each picture what torchvision's FCOS (per picture, per level)
    gives it: the same boxes, scores and order, however many cars the others hold."""
    torch.manual_seed(1)
    decoder = Decoder(model.detector, CONFIG)
    with torch.no_grad():
        outputs = DetectPass(model)(torch.randn(3, 3, 192, 256))
    outputs = (outputs[0] + 4.0, outputs[1], outputs[2] + 2.0)  # an untrained head scores ~0: many candidates
    contents = [(192, 256), (96, 256), (192, 128)]
    together = decoder.cars(outputs, contents)
    levels = [h * w for h, w in level_shapes(CONFIG.detect_size)]
    for i, content in enumerate(contents):
        alone = decoder.cars([o[i : i + 1] for o in outputs], [content])[0]
        split = {
            key: list(o[i : i + 1].split(levels, dim=1))
            for key, o in zip(("cls_logits", "bbox_regression", "bbox_ctrness"), outputs, strict=True)
        }
        theirs = decoder.model.postprocess_detections(split, [decoder.anchors], [content])[0]
        assert len(together[i].boxes) > 10
        for found in (alone, Found(theirs["boxes"], theirs["scores"])):
            assert torch.allclose(together[i].boxes, found.boxes, atol=1e-4)
            assert torch.allclose(together[i].scores, found.scores, atol=1e-6)
        # asked only for the candidates from a score up: those same ones (and the best, whatever its score)
        for at_least in (float(together[i].scores[len(together[i].scores) // 2]), 1.0):
            high = decoder.cars(outputs, contents, at_least)[i]
            expected = max(1, int((together[i].scores >= at_least).sum()))
            assert torch.equal(high.boxes, together[i].boxes[:expected])
            assert torch.equal(high.scores, together[i].scores[:expected])


def test_the_compiled_detector_answers_as_the_eager_one(model):
    batch = torch.randn(2, 3, 192, 256)
    with torch.no_grad():
        eager = DetectPass(model)(batch)
    compiled = make_runner(DetectPass(model), CONFIG.detect_size, "openvino", "fp32").run(batch)
    assert [tuple(o.shape) for o in compiled] == [tuple(o.shape) for o in eager]
    assert [tuple(o.shape[1:]) for o in eager] == [
        (sum(h * w for h, w in level_shapes((256, 192))), n) for n in (1, 4, 1)
    ]
    for mine, theirs in zip(compiled, eager, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3)


CARS = torch.tensor([[0.0, 0.0, 100.0, 50.0], [200.0, 0.0, 260.0, 30.0]])  # 100 and 60 px wide


def test_average_precision_counts_misses_false_boxes_and_their_rank():
    hit = [Found(CARS.clone(), torch.tensor([0.9, 0.8]))]
    assert average_precision(hit, [CARS]) == pytest.approx(1.0)
    half = [Found(CARS[:1].clone(), torch.tensor([0.9]))]  # one car missed: precision 1 up to recall 0.5
    assert average_precision(half, [CARS]) == pytest.approx(0.5)
    wrong_first = [
        Found(torch.cat([torch.tensor([[400.0, 400.0, 500.0, 450.0]]), CARS]), torch.tensor([0.95, 0.9, 0.8]))
    ]
    assert average_precision(wrong_first, [CARS]) == pytest.approx(2 / 3)  # the envelope: 2/3 at every recall
    twice = [Found(torch.cat([CARS[:1], CARS[:1]]), torch.tensor([0.9, 0.8]))]  # a second box on one car is false
    assert average_precision(twice, [CARS]) == pytest.approx(0.5)
    assert average_precision([Found(torch.zeros(0, 4), torch.zeros(0))], [CARS]) == 0.0


def test_precision_and_recall_at_the_threshold_and_per_car_width():
    found = [Found(torch.cat([CARS, torch.tensor([[400.0, 400.0, 500.0, 450.0]])]), torch.tensor([0.9, 0.2, 0.7]))]
    owners, false = matched(found[0], CARS, threshold=0.5)
    assert owners.tolist() == [0, -1] and false == 1  # the 60-px car scored under the threshold
    report = detection_metrics(found, [CARS], threshold=0.5)
    assert report["recall"] == 0.5 and report["precision"] == 0.5
    assert report["recall_48_96"] == 0.0 and report["recall_96_192"] == 1.0 and report["recall_192_up"] is None
    assert math.isclose(report["ap50"], average_precision(found, [CARS]), abs_tol=1e-4)
