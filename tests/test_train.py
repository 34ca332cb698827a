"""train -> evaluate -> export on real car photos, on the CPU, as a user runs them (subprocesses)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import python, smoke_train
from PIL import Image
from torch import nn

from carmodel import models as model_lib
from carmodel.export import ExportDir
from carmodel.presets import ClassificationPresetEval
from training import config as config_lib
from training import model as training_model
from training import model_card, quantize, train, tune
from training.distill import Distillation, Teacher, TeacherError
from training.evaluate import load_run

SMOKE = {}  # conftest.smoke_train's tiny defaults: 4 photos per class, 64 px


@pytest.fixture(scope="module")
def lite0(tmp_path_factory, cars_root) -> Path:
    """A one-epoch EfficientNet-Lite0 run from the offline ImageNet weights, exported."""
    return smoke_train(tmp_path_factory.mktemp("lite0"), cars_root, "efficientnet_lite0", **SMOKE)


@pytest.mark.slow
def test_run_directory_has_metrics_curves_and_checkpoints(lite0):
    run = lite0.parent / "run"
    for name in ("config.yaml", "classes.json", "split.json", "best.pth", "checkpoint.pt", "curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
    assert set(rows[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["init"] == "imagenet" and summary["amp"] in ("torch.bfloat16", "None")
    split = json.loads((run / "split.json").read_text())
    assert split["num_classes"] == 196
    assert set(yaml.safe_load((run / "config.yaml").read_text())) == set(config_lib.Config().to_dict())  # sectioned
    # never train on what the held-out splits hold
    assert not set(split["files"]["train"]) & (set(split["files"]["val"]) | set(split["files"]["test"]))


@pytest.mark.slow
def test_export_has_what_the_archive_builder_needs(lite0):
    assert {p.name for p in lite0.iterdir()} >= set(
        ["efficientnet_lite0_cars.pth", "index_to_name.json", "model.yaml", "metrics.json", "config.yaml", "split.json"]
    )
    index_to_name = json.loads((lite0 / "index_to_name.json").read_text())
    assert len(index_to_name) == 196 and list(index_to_name)[:2] == ["0", "1"]
    # official names, not folder names: "/" cannot be in a folder name
    assert any("C/V" in name for name in index_to_name.values())
    metrics = json.loads((lite0 / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert len(metrics["per_class"]) == 196
    assert {"true", "predicted", "count"} <= set(metrics["most_confused"][0])
    assert (lite0 / "confusion_test.png").stat().st_size > 0
    # the same held-out cars uncropped, side by side with the crops (the photos view)
    assert set(metrics["views"]) == {"crops", "photos", "small_crops"}
    assert metrics["views"]["crops"]["top1"] == metrics["top1"]
    photos = metrics["views"]["photos"]
    assert photos["num_images"] == metrics["num_images"] and 0 <= photos["top1"] <= photos["top5"] <= 1
    assert len(photos["per_class"]) == 196 and (lite0 / "confusion_test_photos.png").stat().st_size > 0
    training_config = config_lib.load(lite0 / "config.yaml")
    assert training_config.model.arch == "efficientnet_lite0"
    assert ExportDir(lite0).model_config == training_config.model  # model.yaml: the model section, nothing else


@pytest.mark.slow
def test_export_round_trip_gives_identical_logits(lite0, car_images):
    """A fresh model from the exported .pth (weights_only) computes exactly what the trained one does."""
    state = torch.load(lite0 / "efficientnet_lite0_cars.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    _, _, trained = load_run(lite0.parent / "run")
    served = ExportDir(lite0).load_model("cpu")
    preset = ClassificationPresetEval(size=config_lib.load(lite0 / "config.yaml").model.eval_size)
    batch = torch.stack([preset(Image.open(p).convert("RGB")) for p in list(car_images.values())[:4]])
    with torch.no_grad():
        assert torch.equal(trained.eval()(batch), served(batch))


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(lite0, cars_root, tmp_path):
    run = lite0.parent / "run"
    out = tmp_path / "resumed"
    result = python(
        "-m", "training.train", "--config", str(run / "config.yaml"), "--epochs", "2",
        "--resume", str(run / "checkpoint.pt"), "--output_dir", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at epoch 2" in result.stderr
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    first = list(csv.DictReader((run / "metrics.csv").open()))[0]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == first  # epoch 1 is carried over, not retrained
    # epoch 2 follows the 2-epoch schedule (cosine down to zero), not the 1-epoch run's it resumed from
    assert float(rows[1]["lr"]) < 1e-9 < float(rows[0]["lr"])


def lr_trace(opt: train.Optimization, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        opt.optimizer.step()
        opt.scheduler.step()
        lrs.append(opt.lr)
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_resumed_lr_schedule_matches_an_uninterrupted_run_even_with_more_epochs(tmp_path, schedule):
    hw = train.Hardware(torch.device("cpu"), None, False)
    net = nn.Linear(4, 3)
    loop = train.Loop(net, [], train_loader=[None] * 5, val_loader=None, channels_last=False)  # 5 steps per epoch

    def optimization(epochs: int) -> train.Optimization:
        optim = config_lib.OptimConfig(epochs=epochs, warmup_epochs=1, lr_schedule=schedule, lr_step_epochs=2)
        return train.Optimization.create(optim, loop, hw, train.Objective(optim))

    interrupted = optimization(epochs=3)
    lr_trace(interrupted, 2 * 5)
    train.save_checkpoint(tmp_path / "checkpoint.pt", net, interrupted, train.Progress([{"epoch": 2}], 1.0, 0))
    for epochs in (3, 6):  # resumed as it was, and with a longer --epochs
        expected = lr_trace(optimization(epochs), epochs * 5)[2 * 5 :]
        resumed = optimization(epochs)
        assert train.resume(tmp_path / "checkpoint.pt", net, resumed, "cpu").epoch == 2
        assert lr_trace(resumed, (epochs - 2) * 5) == expected


def averaging_optimization(net: nn.Module, decay: float) -> train.Optimization:
    hw = train.Hardware(torch.device("cpu"), None, False)
    loop = train.Loop(net, [], train_loader=[None] * 5, val_loader=None, channels_last=False)
    optim = config_lib.OptimConfig(epochs=2, warmup_epochs=0, lr=0.1, ema_decay=decay)
    return train.Optimization.create(optim, loop, hw, train.Objective(optim))


def squared_loss_steps(net: nn.Module, opt: train.Optimization, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` optimiser steps on random data; each step's weights afterwards."""
    generator, weights = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        opt.step(net(torch.randn(8, 4, generator=generator)).pow(2).mean())
        weights.append(net.weight.detach().clone())
    return weights


def test_the_weights_moving_average_is_what_validates_and_is_kept(tmp_path):
    decay, net = 0.8, nn.Linear(4, 3)
    opt = averaging_optimization(net, decay)
    steps = squared_loss_steps(net, opt, 6)
    expected = steps[0]  # the first update takes the weights as they are, then each step moves it (1 - decay)
    for weights in steps[1:]:
        expected = decay * expected + (1 - decay) * weights
    with opt.kept_weights():
        assert torch.allclose(net.weight, expected, atol=1e-6)
    assert torch.equal(net.weight, steps[-1])  # training goes on from its own weights
    # a resumed run goes on with the same average
    train.save_checkpoint(tmp_path / "checkpoint.pt", net, opt, train.Progress([{"epoch": 1}], 1.0, 0))
    more = squared_loss_steps(net, opt, 3, seed=1)
    resumed_net = nn.Linear(4, 3)
    resumed = averaging_optimization(resumed_net, decay)
    train.resume(tmp_path / "checkpoint.pt", resumed_net, resumed, "cpu")
    assert torch.equal(squared_loss_steps(resumed_net, resumed, 3, seed=1)[-1], more[-1])
    with opt.kept_weights(), resumed.kept_weights():
        assert torch.allclose(resumed_net.weight, net.weight)
    assert not torch.equal(net.weight, expected)  # and the last step's weights are not the average's


def test_without_a_moving_average_the_last_steps_weights_are_kept():
    net = nn.Linear(4, 3)
    opt = averaging_optimization(net, 0.0)
    last = squared_loss_steps(net, opt, 3)[-1]
    with opt.kept_weights():
        assert opt.average is None and torch.equal(net.weight, last)


@pytest.mark.parametrize("select_on, kept, best", [("val_loss", [1, 2], 2), ("val_acc", [1, 2, 4], 4)])
def test_the_kept_epoch_is_the_lowest_val_loss_or_the_highest_val_accuracy(select_on, kept, best):
    progress = train.Progress(select_on=select_on)
    epochs = [(1, 2.0, 0.5), (2, 1.5, 0.7), (3, 1.6, 0.6), (4, 1.7, 0.8), (5, 1.8, 0.75)]  # epoch, val loss, val acc
    saved = [e for e, loss, acc in epochs if progress.add({"epoch": e, "val_loss": loss, "val_acc": acc}, loss)]
    assert saved == kept and progress.best()["epoch"] == best
    assert progress.stale == 3 and progress.should_stop(3)  # early stopping watches val loss either way


def test_resume_auto_starts_over_when_the_weights_it_starts_from_were_retrained(tmp_path):
    start, out = tmp_path / "stage1" / "best.pth", tmp_path / "stage2"
    start.parent.mkdir()
    out.mkdir()
    torch.save({}, start)
    cfg = config_lib.load(overrides={"pretrained": str(start), "resume": "auto", "output_dir": str(out)})
    cfg.save(out / "config.yaml")
    torch.save({}, out / train.CHECKPOINT)
    os.utime(start, (1, 1))  # stage 1 older than the checkpoint: an interrupted stage 2 continues
    assert train.checkpoint_to_resume(cfg, out) == out / train.CHECKPOINT
    os.utime(start)  # stage 1 retrained since: the checkpoint learnt from other weights
    os.utime(out / train.CHECKPOINT, (1, 1))
    assert train.checkpoint_to_resume(cfg, out) is None


def tiny_classifier(classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def test_a_student_learns_its_teachers_answers_and_its_val_loss_stays_the_labels():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 12, 12), torch.randint(0, 5, (16,))
    teacher = Distillation([Teacher(tiny_classifier(), size=8)], temperature=2.0)  # it sees them at its own size
    student = tiny_classifier()
    hw = train.Hardware(torch.device("cpu"), None, False)
    optim = config_lib.OptimConfig(distill_weight=1.0, label_smoothing=0.0)  # the teacher's term alone
    taught, plain = train.Objective(optim, teachers=teacher), train.Objective(optim)
    with torch.no_grad():  # validation: the labels' loss, as without a teacher
        assert torch.equal(taught(student, images, labels, hw, False)[0], plain(student, images, labels, hw, False)[0])

    def disagreement() -> float:
        with torch.no_grad():
            return teacher.loss(student(images), images).item()

    before, sgd = disagreement(), torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(100):
        loss = taught(student, images, labels, hw, False)[0]
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    assert disagreement() < before / 4
    with torch.no_grad():
        agrees = (student(images).argmax(1) == teacher.target(images).argmax(1)).float().mean().item()
        right = (student(images).argmax(1) == labels).float().mean().item()
    assert agrees >= 0.8 and right < agrees  # it learnt the teacher's answers, not the labels


def test_teachers_answer_together_as_the_average_of_their_probabilities():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 12, 12)
    teachers = [Teacher(tiny_classifier(), size=12), Teacher(tiny_classifier(), size=10)]
    together = Distillation(teachers, temperature=3.0).target(images).exp()
    alone = [Distillation([t], temperature=3.0).target(images).exp() for t in teachers]
    assert torch.allclose(together, (alone[0] + alone[1]) / 2, atol=1e-6)
    assert torch.allclose(together.sum(1), torch.ones(6))


def test_a_teacher_must_be_a_finished_run_of_the_same_classes(tmp_path):
    with pytest.raises(TeacherError, match="config.yaml not found"):
        Teacher.load(tmp_path, ["a", "b"], "cpu")
    config_lib.Config().save(tmp_path / "config.yaml")
    (tmp_path / "classes.json").write_text(json.dumps(["a", "c"]))
    torch.save({}, tmp_path / "best.pth")
    with pytest.raises(TeacherError, match="other classes"):
        Teacher.load(tmp_path, ["a", "b"], "cpu")


@pytest.mark.slow
def test_distillation_trains_a_student_from_a_teachers_run(lite0, cars_root, tmp_path):
    teacher = lite0.parent / "run"
    export = smoke_train(tmp_path, cars_root, "efficientnet_lite0", distill_from=str(teacher), **SMOKE)
    recorded = config_lib.load(export.parent / "run" / "config.yaml")
    assert recorded.optim.distill_from == (str(teacher),) and recorded.optim.distill_weight == 0.5
    rows = list(csv.DictReader((export.parent / "run" / "metrics.csv").open()))
    assert rows and all(float(r["train_loss"]) > 0 for r in rows)
    # the export says who taught it, and the card counts the teacher's time in the training's
    taught = json.loads((export / "metrics.json").read_text())["teachers"]
    assert [(t["run"], t["arch"]) for t in taught] == [(str(teacher), "efficientnet_lite0")]
    card = (export / model_card.CARD).read_text()
    assert "Taught by" in card and str(teacher) in card


@pytest.mark.slow
def test_frozen_trunk_trains_the_head_on_cached_features(cars_root, tmp_path):
    export = smoke_train(tmp_path, cars_root, "efficientnet_lite0", unfreeze=0, **SMOKE)
    trained = torch.load(export / "efficientnet_lite0_cars.pth", weights_only=True)
    imagenet, _ = training_model.build_model("efficientnet_lite0", 196, "imagenet")
    reference = imagenet.state_dict()
    head = model_lib.spec("efficientnet_lite0").head
    trunk = [k for k in trained if not k.startswith(head + ".")]
    assert trunk and all(torch.equal(trained[k], reference[k]) for k in trunk)
    assert not torch.equal(trained[f"{head}.weight"], reference[f"{head}.weight"])


@pytest.mark.slow
def test_a_box_head_trains_on_the_photos_boxes_and_is_evaluated_on_them(cars_root, tmp_path):
    """locate_size > 0: the Localizer trains on crops and photos (photos/boxes.csv), exports with
    its box head, and the held-out whole photos are evaluated through the whole chain."""
    export = smoke_train(
        tmp_path, cars_root, "efficientnet_lite0", pretrained="none", locate_size=32, downscale_prob=0.5
    )
    config = yaml.safe_load((export / "model.yaml").read_text())
    assert config["locate_size"] == 32 and config["crop_margin"] == 0.05
    weights = torch.load(export / "efficientnet_lite0_cars.pth", weights_only=True)
    assert any(k.startswith("box_head.") for k in weights) and any(k.startswith("net.") for k in weights)
    metrics = json.loads((export / "metrics.json").read_text())
    photos = metrics["views"]["photos"]
    assert photos["num_images"] == metrics["views"]["crops"]["num_images"] > 0
    assert photos["boxes_checked"] > 0.8 * photos["num_images"]  # the boxes boxes.csv trusts
    assert 0 <= photos["box_iou_mean"] <= 1 and 0 <= photos["box_iou_at_least_0.5"] <= 1
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert rows and float(rows[0]["val_loss"]) > 0  # validated on the val cars' photos and crops
    # int8 for both passes; the smoke model is near chance, so any loss is allowed
    result = python("-m", "training.quantize", "--export", str(export), "--images", "16", "--max_loss", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "quantization.json").read_text())
    assert report["calibration_inputs"] == 24  # 8 crops, 8 photos twice
    assert int8_weights(export / "efficientnet_lite0_cars_int8.xml") == {
        "first convolution": False,
        "classifier": False,
        "box head": False,
        "the rest": True,
    }
    assert {"top1_int8", "top1_int8_photos"} <= set(report)


def int8_weights(xml: Path) -> dict[str, bool]:
    """Whether the int8 model's convolutions and matrix products in each part have int8 weights (a
    float layer reads its weights from a constant; an int8 one from their dequantization)."""
    import openvino as ov

    parts = {"first convolution": [], "classifier": [], "box head": [], "the rest": []}
    layers = [op for op in ov.Core().read_model(xml).get_ordered_ops() if op.get_type_name() in LAYER_TYPES]
    for index, op in enumerate(layers):
        name = op.get_friendly_name()
        part = (
            "first convolution"
            if index == 0
            else "classifier"
            if "net.classifier" in name
            else "box head"
            if "box_head" in name
            else "the rest"
        )
        parts[part].append(op.input_value(1).get_node().get_type_name() != "Constant")
    return {part: all(int8) if all(int8) or not any(int8) else "mixed" for part, int8 in parts.items() if int8}


LAYER_TYPES = ("Convolution", "GroupConvolution", "MatMul")


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """A command's main in this process (its imports paid once, not per command): its exit status and
    stderr. An exception it does not turn into a clear error fails the test with its traceback."""
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's own usage errors
        code = exited.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data_root", "/no/such/cars"], "/no/such/cars"),
        (["--arch", "vgg11"], "vgg11"),
        (["--optimizer", "lbfgs"], "lbfgs"),
        (["--epochs", "many"], "epochs"),
    ],
)
def test_bad_settings_fail_before_training_with_a_clear_message(flags, message, tmp_path, capsys):
    code, stderr = run_main(train.main, ["--output_dir", str(tmp_path / "run"), *flags], capsys)
    assert code == 2, stderr[-2000:]
    assert "error:" in stderr and message in stderr


@pytest.mark.slow
def test_final_fit_trains_on_train_plus_val_and_keeps_the_last_epoch(cars_root, tmp_path):
    """--fit_on train+val: val joins training, no early stopping, test stays held out."""
    export = smoke_train(tmp_path, cars_root, "efficientnet_lite0", fit_on="train+val", epochs=2, unfreeze=0)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    assert split["counts"]["val"] == 0 and split["counts"]["test"] > 0
    assert not set(split["files"]["train"]) & set(split["files"]["test"])
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["fit_on"] == "train+val" and summary["best_epoch"] == summary["epochs_run"] == 2
    assert summary["train_images"] == split["counts"]["train"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["val_loss"] for r in rows] == ["", ""]
    assert json.loads((export / "metrics.json").read_text())["split"] == "test"


def test_tune_refuses_a_final_fit_config(tmp_path, capsys):
    code, stderr = run_main(tune.main, ["--fit_on", "train+val", "--output_dir", str(tmp_path)], capsys)
    assert code == 2 and "--fit_on train" in stderr


@pytest.mark.slow
def test_quantize_adds_a_calibrated_int8_model_or_nothing(lite0, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(lite0, export)
    int8 = export / "efficientnet_lite0_cars_int8.xml"
    # The smoke model is close to chance: its top-1 is noise, so any loss is allowed here.
    result = python("-m", "training.quantize", "--export", str(export), "--images", "16", "--max_loss", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((export / "quantization.json").read_text())
    assert report["calibration_images"] == 16 and report["calibration_split"] == "train"
    assert 0 <= report["top1_int8"] <= 1 and report["held_out_images"] > 0
    assert int8.is_file() and int8.with_suffix(".bin").is_file()

    # A calibration that loses more than allowed is not kept (here: nothing is allowed to be lost at all).
    result = python("-m", "training.quantize", "--export", str(export), "--images", "16", "--max_loss", "-1")
    assert result.returncode == 2 and "not kept" in result.stderr, result.stderr[-3000:]
    assert not int8.exists() and not int8.with_suffix(".bin").exists()


def test_quantize_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    code, stderr = run_main(quantize.main, ["--export", str(tmp_path)], capsys)
    assert code == 2 and "not a training.export directory" in stderr


@pytest.mark.slow
def test_resume_auto_continues_the_same_recipe_and_starts_another_over(lite0, tmp_path):
    """make train's --resume auto: a finished run of this config trains nothing more; another config's
    checkpoint in the folder is not resumed."""
    out = tmp_path / "run"
    shutil.copytree(lite0.parent / "run", out)
    config = str(out / "config.yaml")
    again = python("-m", "training.train", "--config", config, "--resume", "auto", "--output_dir", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and [r["epoch"] for r in csv.DictReader((out / "metrics.csv").open())] == [
        "1"
    ]
    other = python(
        "-m", "training.train", "--config", config, "--resume", "auto", "--output_dir", str(out), "--lr", "0.0001",
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-3000:]
    assert "holds a run of another config: starting over" in other.stderr and "resumed from" not in other.stderr


@pytest.mark.slow
def test_calibration_fitted_on_val_is_taken_over_by_the_train_plus_val_fit(cars_root, tmp_path):
    """make train's order: the car detector, the car check and the calibration (size and image quality) on
    the train-only run's val answers, then the train+val run's own detector and car check (val cars among
    their pictures) and that calibration carried over."""
    smoke = {"locate_size": 32, "unfreeze": 0, "cache_features": "false", "photo_conditions_prob": 0.5}
    smoke_train(tmp_path / "heldout", cars_root, "efficientnet_lite0", **smoke)
    smoke_train(tmp_path / "final", cars_root, "efficientnet_lite0", fit_on="train+val", **smoke)
    heldout, final = tmp_path / "heldout" / "run", tmp_path / "final" / "run"
    for run in (heldout, final):
        result = python("-m", "training.detector", "--run", str(run), "--composites", "12", "--epochs", "1")
        assert result.returncode == 0, result.stderr[-3000:]
    heldout_head, final_head = (json.loads((run / "detector.json").read_text()) for run in (heldout, final))
    assert "val_composites" in heldout_head and "val_composites" not in final_head  # val is no longer held out there
    assert 0 <= heldout_head["val_photos"]["ap50"] <= 1 and heldout_head["val_photos"]["cars"] > 0
    assert final_head["train_cars"] > heldout_head["train_cars"]
    for run in (heldout, final):
        result = python("-m", "training.verifier", "--run", str(run), "--composites", "12", "--epochs", "1")
        assert result.returncode == 0, result.stderr[-3000:]
    heldout_check, final_check = (json.loads((run / "verifier.json").read_text()) for run in (heldout, final))
    assert "val" in heldout_check and "val" not in final_check
    assert heldout_check["val"]["cars"] > 0 and heldout_check["val"]["not_cars"] > 0
    assert 0 <= heldout_check["val"]["auroc_car_score"] <= 1
    assert final_check["train_candidates"]["cars"] > heldout_check["train_candidates"]["cars"]

    refused = python("-m", "training.calibrate", "--run", str(final))
    assert refused.returncode == 2 and "no val cars are left" in refused.stderr
    fitted = python("-m", "training.calibrate", "--run", str(heldout))
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    report = json.loads(fitted.stdout)
    assert set(report["val"]) == {"crops", "photos", "small_crops", "crops_in_photo_conditions", "without_quality"}
    calibration = report["calibration"]
    assert len(calibration["quality_weights"]) == len(calibration["quality_mean"]) == 4
    assert calibration["fitted_on"].startswith("val split")

    carried = python("-m", "training.calibrate", "--run", str(final), "--fitted_on", str(heldout))
    assert carried.returncode == 0, carried.stderr[-3000:]
    taken = json.loads((final / "calibration.json").read_text())
    assert {k: v for k, v in taken.items() if k != "fitted_on"} == {
        k: v for k, v in calibration.items() if k != "fitted_on"
    }
    assert "train alone" in taken["fitted_on"]
    source = json.loads((final / "calibration_from.json").read_text())  # the card's training time counts it
    assert source["run"] == str(heldout) and source["training"]["fit_on"] == "train"
    assert {"detector", "car_check"} <= set(source)
    assert calibration["detect_threshold"] >= 0.05  # the detector's floor: never 0, which would mean "unset"
    missing = python("-m", "training.calibrate", "--run", str(final), "--fitted_on", str(tmp_path))
    assert missing.returncode == 2 and "calibrate that run first" in missing.stderr
