"""carmodel's export contract and inference chain, in-process, on the shipped model and real photos."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import DEFAULT_EXPORT
from PIL import Image

from carmodel.config import ModelConfig
from carmodel.export import ExportDir, ExportError
from carmodel.models import build_model
from carmodel.predictor import Predictor
from carmodel.presets import eval_preset

MODEL = "efficientnet_lite0_cars"


@pytest.fixture(scope="module")
def reference() -> Predictor:
    return Predictor.for_export(ExportDir(DEFAULT_EXPORT), backend="torch")


@pytest.fixture(scope="module")
def photos(car_images) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in list(car_images.values())[:4]]


# ---------------------------------------------------------------------------- ExportDir


def test_the_shipped_export_follows_the_contract():
    export = ExportDir(DEFAULT_EXPORT)
    export.validate(MODEL)
    assert export.model_name == MODEL and export.weights.name == f"{MODEL}.pth"
    assert export.has_int8 and [p.name for p in export.int8_files] == [f"{MODEL}_int8.xml", f"{MODEL}_int8.bin"]
    assert {p.name for p in export.serving_files()} == {
        "model.yaml",
        "index_to_name.json",
        f"{MODEL}.pth",
        f"{MODEL}_int8.xml",
        f"{MODEL}_int8.bin",
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
    with pytest.raises(ExportError, match="unknown model config keys: learning_rate"):
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


# ---------------------------------------------------------------------------- Predictor


def test_predictor_is_preset_then_model_then_softmax_topk(reference, photos):
    """The chain by hand (the eval preset, the eager model, softmax, top-k) gives the predictor's answer."""
    model = ExportDir(DEFAULT_EXPORT).load_model()
    preset = eval_preset(ExportDir(DEFAULT_EXPORT).model_config)
    with torch.no_grad():
        probabilities = model(torch.stack([preset(p) for p in photos])).softmax(1)
    answers = reference.predict(photos, k=3)
    for row, answer in zip(probabilities, answers, strict=True):
        top = torch.topk(row, 3)
        assert [p.class_id for p in answer] == top.indices.tolist()
        assert [p.probability for p in answer] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [p.class_name for p in answer] == [reference.classes[i] for i in top.indices.tolist()]


def test_top_k_per_row_best_first_and_capped_at_the_classes(reference, photos):
    logits = reference.logits([reference.preprocess(p) for p in photos[:3]])
    answers = reference.top_k(logits, [1, 5, 500])
    assert [len(a) for a in answers] == [1, 5, 196]
    for answer in answers:
        probabilities = [p.probability for p in answer]
        assert probabilities == sorted(probabilities, reverse=True)
    assert sum(p.probability for p in answers[2]) == pytest.approx(1.0, abs=1e-4)
    assert answers[0][0].to_dict().keys() == {"class_id", "class_name", "probability"}


def test_the_default_predictor_serves_the_int8_model_and_agrees(reference, photos):
    fast = Predictor.for_export(ExportDir(DEFAULT_EXPORT))
    assert fast.engine == "openvino int8" and reference.engine == "torch fp32"
    assert [a[0].class_id for a in fast.predict(photos, k=1)] == [a[0].class_id for a in reference.predict(photos, k=1)]
