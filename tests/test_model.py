"""carmodel.models (and the training.model CLI): the offline ImageNet init is real, freezing is what it says,
inits are explicit."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from PIL import Image

from carmodel import models as model_lib
from carmodel.presets import ClassificationPresetEval
from training import model as model_cli

# ImageNet classes a car photo plausibly gets: sports car, convertible, cab, limousine, minivan,
# pickup, racer, beach wagon, jeep, Model T, grille, car wheel, ambulance, police van, ...
IMAGENET_CAR_CLASSES = {
    407,
    436,
    468,
    479,
    511,
    569,
    575,
    581,
    609,
    627,
    656,
    661,
    675,
    705,
    717,
    734,
    751,
    757,
    803,
    817,
    864,
    867,
    874,
}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_mapping_sees_cars_in_real_photos(cars_root, arch):
    """The key mapping is right iff the 1000-class ImageNet head recognises cars as cars."""
    model, init = model_cli.build_model(arch, 1000, "imagenet")
    assert init == "imagenet"
    files = sorted((cars_root / "train").glob("*/*.jpg"))
    files = random.Random(0).sample(files, 32)
    preset = ClassificationPresetEval(size=224)
    batch = torch.stack([preset(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top1 = model.eval()(batch).argmax(1).tolist()
    car_share = sum(c in IMAGENET_CAR_CLASSES for c in top1) / len(top1)
    assert car_share >= 0.8, f"only {car_share:.0%} of car photos got an ImageNet car class"
    random_model, _ = model_cli.build_model(arch, 1000, "none")
    with torch.no_grad():
        random_top1 = random_model.eval()(batch).argmax(1).tolist()
    assert sum(c in IMAGENET_CAR_CLASSES for c in random_top1) / len(top1) < 0.5


def test_init_is_logged_and_random_only_on_request(caplog):
    with caplog.at_level(logging.INFO, logger="carmodel.models"):
        model_cli.build_model("mobilenet_v2", 196, "none")
    assert "init random (pretrained=none)" in caplog.text


def test_local_weights_file_initialises_the_trunk_and_keeps_a_fresh_head(tmp_path):
    source, _ = model_cli.build_model("mobilenet_v2", 1000, "none")
    path = tmp_path / "imagenet_like.pth"
    torch.save(source.state_dict(), path)
    model, init = model_cli.build_model("mobilenet_v2", 196, str(path))
    assert init == f"file:{path}"
    assert torch.equal(model.features[3].conv[0][0].weight, source.features[3].conv[0][0].weight)
    assert model.classifier[1].out_features == 196


def test_missing_weights_file_is_an_error_not_a_random_model(tmp_path):
    with pytest.raises(model_lib.PretrainedWeightsError, match="weights file not found"):
        model_cli.build_model("resnet50", 196, str(tmp_path / "nope.pth"))


def test_weights_for_another_architecture_are_refused(tmp_path):
    other, _ = model_cli.build_model("mobilenet_v2", 196, "none")
    torch.save(other.state_dict(), tmp_path / "m.pth")
    with pytest.raises(model_lib.PretrainedWeightsError, match="do not fit"):
        model_cli.build_model("efficientnet_b0", 196, str(tmp_path / "m.pth"))


@pytest.mark.parametrize(
    ("arch", "unfreeze"),
    [("resnet50", 1), ("resnet50", 2), ("efficientnet_lite0", 5), ("efficientnet_b0", 2), ("mobilenet_v2", 3)],
)
def test_freeze_trains_only_the_last_blocks_and_the_head(arch, unfreeze):
    model, _ = model_cli.build_model(arch, 196, "none")
    frozen = model_cli.freeze(model, arch, unfreeze)
    blocks = model_lib.spec(arch).blocks(model)
    assert len(frozen) == len(blocks) - unfreeze
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for m in blocks[-unfreeze:] + [model_lib.head_module(model, arch)] for p in m.parameters()}
    assert trainable == expected
    model_cli.train_mode(model, frozen)
    assert all(not m.training for b in frozen for m in b.modules())
    assert model_lib.head_module(model, arch).training


def test_unfreeze_zero_is_a_linear_probe_and_minus_one_trains_all():
    model, _ = model_cli.build_model("mobilenet_v2", 196, "none")
    model_cli.freeze(model, "mobilenet_v2", 0)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.classifier.parameters()}
    model_cli.freeze(model, "mobilenet_v2", -1)
    assert all(p.requires_grad for p in model.parameters())


def test_model_cli_reads_the_sectioned_config_from_flat_flags(capsys):
    argv = ["--arch", "mobilenet_v2", "--pretrained", "none", "--unfreeze", "3", "--num_classes", "10"]
    assert model_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("mobilenet_v2: init=random") and "frozen_blocks=16" in out
