"""Evaluate a trained run (or an export) on its held-out split, in each view of the same cars.

Recreates the split from the saved config (and checks it against the recorded split.json, so a
changed dataset cannot silently change the test set), then reports top-1/top-5, per-class
precision/recall/F1, the most confused class pairs and a confusion-matrix PNG for each view:
`crops` (the bounding-box crops the model trains on) and, where the dataset has them, `photos`
(the same held-out cars uncropped, as people photograph them), and `small_crops` (the crops shrunk to
100 px on the longer side, like a car in a web thumbnail). The crops' figures stay the top
level of the metrics JSON; every view's are under `views`.

    python -m training.evaluate --run runs/efficientnet_lite0
    python -m training.evaluate --run runs/efficientnet_lite0 --split val --eval_size 192
    python -m training.evaluate --export models/efficientnet_lite0_cars --out var/eval --views crops photos
    python -m training.evaluate --export models/efficientnet_lite0_cars --out var/eval --views crops --corruptions
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import top_k_accuracy_score
from torchvision.ops import box_iou
from tqdm import tqdm

from carmodel import models as model_lib
from carmodel.calibration import CALIBRATION, Calibration, image_quality
from carmodel.detection import Found
from carmodel.errors import exit_with
from carmodel.export import MODEL_CONFIG, TRAINING_CONFIG, ExportDir, ExportError
from carmodel.images import ImageLimits, decode_image
from carmodel.predictor import MAX_CARS, Forward, Predictor
from carmodel.presets import decode_side
from carmodel.runners import torch_runner
from training import composites, corruptions, data, plots, tracking
from training import config as config_lib
from training.train import pick_device

log = logging.getLogger(__name__)
MOST_CONFUSED = 15
ECE_BINS = 15


def load_trained(folder: Path, overrides: dict | None = None):
    """(config, classes, model) of a finished training run or of an export (carmodel/export.py)."""
    if (folder / MODEL_CONFIG).is_file():
        export = ExportDir(folder)
        return config_lib.load(export.record(TRAINING_CONFIG), overrides), export.classes(), export.load_model()
    return load_run(folder, overrides)


def load_run(run_dir: Path, overrides: dict | None = None):
    """(config, classes, model) of a finished training run."""
    for name in ("config.yaml", "classes.json", "best.pth"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a finished training run?")
    cfg = config_lib.load(run_dir / "config.yaml", overrides)
    classes = json.loads((run_dir / "classes.json").read_text())
    model, _ = model_lib.build_for(cfg.model, len(classes))
    model.load_state_dict(torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True))
    return cfg, classes, model


def held_out_samples(cfg, run_dir: Path, split: str) -> list[data.Sample]:
    index = data.scan(cfg.data.data_root, cfg.data.layout)
    samples = data.make_splits(index, cfg.data)[split]
    recorded = run_dir / "split.json"
    if recorded.is_file():
        expected = json.loads(recorded.read_text())["files"][split]
        actual = data.split_manifest(index, {split: samples}, cfg.data.data_root)["files"][split]
        if expected != actual:
            raise data.DatasetError(
                f"the {split} split differs from the one recorded in {recorded}: has the data changed?"
            )
    return samples


def reference_predictor(model, cfg, classes: list[str], calibration: Calibration | None = None) -> Predictor:
    """The fp32 eager model behind carmodel's inference chain: what every fast path is held to. It
    classifies each image's most prominent car alone (max_cars 1): what the views measure."""
    model = model.eval().to(pick_device(cfg.runtime.device))
    runner = torch_runner(model)  # eager torch takes any image size: the locator too
    locator = runner if cfg.model.localizes else None
    if cfg.model.detects:
        locator = torch_runner(model_lib.DetectPass(model))
    predictor = Predictor(model, cfg.model, classes, runner, locator, calibration)
    predictor.max_cars = 1
    return predictor


def image_batches(
    samples,
    cfg,
    crop_to_bbox: bool | None = None,
    longest_side: int | None = None,
    corruption: Callable[[Image.Image], Image.Image] | None = None,
):
    """(PIL images, labels) in batches of `samples`, each photo decoded once (and shrunk so that its
    longer side is at most `longest_side`; then put through `corruption`: training/corruptions.py's, or
    calibration's photo conditions)."""
    crop = cfg.data.crop_to_bbox if crop_to_bbox is None else crop_to_bbox
    size, side = cfg.optim.batch_size, decode_side(cfg.model)  # decoded as the server decodes
    for start in tqdm(range(0, len(samples), size), desc="evaluating", disable=not cfg.runtime.progress, leave=False):
        chunk = samples[start : start + size]
        images = [data.load_image(s, crop, side) for s in chunk]
        if longest_side:
            for image in images:
                image.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
        if corruption:
            images = [corruption(image) for image in images]
        yield images, torch.tensor([s.label for s in chunk])


@dataclass
class Outputs:
    """The chain's outputs over a list of images (carmodel.predictor.Forward, gathered), and their labels."""

    logits: torch.Tensor
    labels: torch.Tensor
    sides: torch.Tensor
    boxes: list | None  # None without a box head
    car_scores: torch.Tensor | None  # None without a car head
    quality: torch.Tensor  # carmodel.calibration.image_quality of each classified image
    detect_scores: torch.Tensor | None = None  # a detector's own scores (car_scores: also checked); None without


def predict(
    predictor: Predictor,
    samples,
    cfg,
    crop_to_bbox: bool | None = None,
    longest_side: int | None = None,
    corruption: Callable[[Image.Image], Image.Image] | None = None,
) -> Outputs:
    """Every image of `samples` through the whole chain."""
    forwards, labels = [], []
    for images, targets in image_batches(samples, cfg, crop_to_bbox, longest_side, corruption):
        forwards.append(predictor.forward(images))
        labels.append(targets)
    scores = [f.car_scores for f in forwards if f.car_scores is not None]
    detected = [f.detect_scores for f in forwards if f.detect_scores is not None]
    return Outputs(
        logits=torch.cat([f.logits for f in forwards]),
        labels=torch.cat(labels),
        sides=torch.cat([f.sides for f in forwards]),
        boxes=[box for f in forwards for box in f.boxes] if predictor.localizes else None,
        car_scores=torch.cat(scores) if scores else None,
        detect_scores=torch.cat(detected) if detected else None,
        quality=torch.cat([image_quality(torch.stack(f.inputs), cfg.model.mean, cfg.model.std) for f in forwards]),
    )


def compare_top1(predictors: dict[str, Predictor], samples, cfg, crop_to_bbox: bool | None = None) -> dict:
    """Top-1 of each predictor over the same photos (decoded once), how often each agrees with the
    first, and its time through the chain after decoding in images/s."""
    names = list(predictors)
    correct, agree, seconds = dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    for images, labels in image_batches(samples, cfg, crop_to_bbox):
        top1 = {}
        for name, predictor in predictors.items():
            started = time.perf_counter()
            top1[name] = predictor.forward(images).logits.argmax(1)
            seconds[name] += time.perf_counter() - started
            correct[name] += int((top1[name] == labels).sum())
            agree[name] += int((top1[name] == top1[names[0]]).sum())
    n = max(1, len(samples))
    return {
        name: {"top1": correct[name] / n, "agreement": agree[name] / n, "img_per_s": n / max(seconds[name], 1e-9)}
        for name in names
    }


def box_metrics(found: list, photos: list[data.Sample], cfg) -> dict:
    """How well the found boxes fit photos/boxes.csv's, on the photos whose box there is trusted."""
    from torchvision.ops import box_iou

    known = data.photo_boxes(photos, cfg.data.data_root)
    pairs = [
        (f, k.box) for f, k in zip(found, known, strict=True) if k is not None and k.match >= cfg.data.min_box_match
    ]
    if not pairs:
        return {"boxes_checked": 0}
    ious = box_iou(torch.tensor([f for f, _ in pairs], dtype=torch.float32), torch.tensor([k for _, k in pairs])).diag()
    return {
        "boxes_checked": len(pairs),
        "box_iou_mean": round(float(ious.mean()), 4),
        "box_iou_at_least_0.5": round(float((ious >= 0.5).float().mean()), 4),
    }


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    return float(top_k_accuracy_score(labels, logits, k=k, labels=np.arange(logits.shape[1])))


def most_confused_pairs(matrix: np.ndarray, classes: list[str], n: int = MOST_CONFUSED) -> list[dict]:
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None)[:n]
    pairs = []
    for flat in order:
        true, pred = np.unravel_index(flat, matrix.shape)
        if off_diagonal[true, pred] == 0:
            break
        pairs.append({"true": classes[true], "predicted": classes[pred], "count": int(off_diagonal[true, pred])})
    return pairs


def compute_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import classification_report, confusion_matrix

    preds = logits.argmax(1)
    label_ids = list(range(len(classes)))
    report = classification_report(
        labels, preds, labels=label_ids, target_names=classes, output_dict=True, zero_division=0
    )
    matrix = confusion_matrix(labels, preds, labels=label_ids)
    return {
        "num_images": int(len(labels)),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "macro_f1": report["macro avg"]["f1-score"],
        "per_class": {name: {k: round(v, 4) for k, v in report[name].items()} for name in classes},
        "most_confused": most_confused_pairs(matrix, classes),
        "_confusion_matrix": matrix,
    }


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy, averaged over `bins` equal-width confidence bins
    weighted by how many answers fall in each (top-1, as Guo et al., 2017)."""
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in np.unique(which):
        inside = which == b
        gap += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(gap)


@dataclass
class Confidence:
    """Each answer's top-1 probability before and after calibration, and whether it was right."""

    uncalibrated: np.ndarray
    calibrated: np.ndarray
    correct: np.ndarray


def answer_metrics(predictor: Predictor, outputs: Outputs) -> tuple[dict, Confidence]:
    """What a person is told, measured: calibration (ECE, 15 bins), the make and body type summed over
    their classes, cars answered "no car", and the answers marked sure with how often they are right."""
    probabilities = predictor.calibration.probabilities(outputs.logits, outputs.sides, outputs.quality)
    confidence = Confidence(
        torch.softmax(outputs.logits.float(), 1).max(1).values.numpy(),
        probabilities.max(1).values.numpy(),
        (outputs.logits.argmax(1) == outputs.labels).numpy(),
    )
    predicted = outputs.logits.argmax(1)

    def accuracy_summed(of: torch.Tensor) -> float:
        return float((predictor.summed(probabilities, of).argmax(1) == of[outputs.labels]).float().mean())

    forward = Forward(outputs.logits, [], outputs.boxes, outputs.sides, outputs.car_scores, quality=outputs.quality)
    answers = predictor.answer(forward, 1)
    found = np.array([a.car_found for a in answers])
    sure = np.array([a.car_found and not a.uncertain for a in answers])
    metrics = {
        "ece": expected_calibration_error(confidence.calibrated, confidence.correct),
        "ece_uncalibrated": expected_calibration_error(confidence.uncalibrated, confidence.correct),
        "mean_top1_probability": float(confidence.calibrated.mean()),
        "mean_top1_probability_uncalibrated": float(confidence.uncalibrated.mean()),
        "make_accuracy": accuracy_summed(predictor.make_of),
        "make_accuracy_of_top1_class": float(
            (predictor.make_of[predicted] == predictor.make_of[outputs.labels]).float().mean()
        ),
        "body_type_accuracy": accuracy_summed(predictor.body_of),
        "no_car": float(1 - found.mean()),
        "sure_coverage": float(sure.mean()),
        "sure_accuracy": float(confidence.correct[sure].mean()) if sure.any() else None,
    }
    return {k: v if v is None else round(v, 4) for k, v in metrics.items()}, confidence


def no_car_metrics(predictor: Predictor) -> dict:
    """The no-car test set (training/nocar.py): how many of its pictures are answered "no car"."""
    from training import nocar

    pictures = nocar.test_pictures()
    answers = predictor.predict([picture for _, picture in pictures], k=1)
    called_cars = {name: round(a.car_score, 4) for (name, _), a in zip(pictures, answers, strict=True) if a.car_found}
    return {
        "pictures": len(pictures),
        "answered_no_car": round(1 - len(called_cars) / len(pictures), 4),
        "answered_car": called_cars,
    }


def as_uploaded(picture: Image.Image, predictor: Predictor) -> Image.Image:
    """`picture` as the server has it: sent as a JPEG (quality 90) and decoded no larger than the model needs."""
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return decode_image(buffer.getvalue(), ImageLimits(), predictor.decode_side)


WIDTH_BINS = ((48, 96), (96, 192), (192, 100_000))  # car widths (pixels of the picture) reported apart


def average_precision(found: list[Found], truths: list[torch.Tensor], iou: float = 0.5) -> float:
    """AP at `iou` (all-point interpolation, as PASCAL VOC from 2010): detections of every picture ranked
    by score, each matched to the best-overlapping car not matched yet."""
    scores, hits = [], []
    for picture, cars in zip(found, truths, strict=True):
        taken = torch.zeros(len(cars), dtype=torch.bool)
        overlaps = box_iou(picture.boxes, cars) if len(cars) and len(picture.boxes) else None
        for i, score in enumerate(picture.scores.tolist()):
            hit = False
            if overlaps is not None:
                best = overlaps[i].masked_fill(taken, 0).max(0)
                if float(best.values) >= iou:
                    taken[best.indices] = hit = True
            scores.append(score)
            hits.append(hit)
    total = sum(len(cars) for cars in truths)
    if not total:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.cumsum(np.asarray(hits, dtype=float)[order])
    recall, precision = tp / total, tp / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the interpolated envelope
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision)) if len(tp) else 0.0


def matched(found: Found, cars: torch.Tensor, threshold: float, iou: float = 0.5) -> tuple[torch.Tensor, int]:
    """For each car, the index of the detection (score >= threshold) that found it (-1: missed), greedily
    by score; and how many such detections found no car (false positives)."""
    keep = found.scores >= threshold
    boxes = found.boxes[keep]
    owner = torch.full((len(cars),), -1, dtype=torch.int64)
    if not len(cars) or not len(boxes):
        return owner, len(boxes)
    overlaps = box_iou(boxes, cars)
    for i in range(len(boxes)):
        best = overlaps[i].masked_fill(owner >= 0, 0).max(0)
        if float(best.values) >= iou:
            owner[best.indices] = i
    return owner, len(boxes) - int((owner >= 0).sum())


def detection_metrics(found: list[Found], truths: list[torch.Tensor], threshold: float) -> dict:
    """AP50, and at `threshold` precision and recall, overall and per car width (boxes in the pictures' pixels)."""
    owners, false = zip(*(matched(f, t, threshold) for f, t in zip(found, truths, strict=True)), strict=True)
    found_cars, cars = sum(int((o >= 0).sum()) for o in owners), sum(len(t) for t in truths)
    kept = found_cars + sum(false)
    report = {
        "pictures": len(found),
        "cars": cars,
        "ap50": round(average_precision(found, truths), 4),
        "threshold": round(threshold, 4),
        "precision": round(found_cars / kept, 4) if kept else None,
        "recall": round(found_cars / cars, 4) if cars else None,
    }
    if not cars:
        return report
    widths, hit = torch.cat([t[:, 2] - t[:, 0] for t in truths]), torch.cat(owners) >= 0
    for low, high in WIDTH_BINS:
        inside = (widths >= low) & (widths < high)
        name = f"recall_{low}_{high}" if high < 100_000 else f"recall_{low}_up"
        report[name] = round(float(hit[inside].float().mean()), 4) if inside.any() else None
    return report


DETECTION_SCENES = 300  # test composites (training/composites.py): about 900 cars


def detector_candidates(predictor: Predictor, prepared: list, to_scene: float) -> Found:
    """The detector's candidates in one prepared picture, in the scene's pixels (`to_scene` per decoded pixel)."""
    boxes, scores = predictor.find(prepared)[0]
    return Found(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * to_scene, torch.tensor(scores))


def detection_test_metrics(
    predictor: Predictor, cfg, samples, count: int = DETECTION_SCENES, classify: bool = True
) -> dict:
    """The detector on composites of the held-out cars on the held-out backgrounds: AP50, precision and
    recall at the car threshold, recall per car width; and top-1 of the cars it found against top-1 of the
    same cars cut at their true box (the crops at the same size), per width. With the car check, the
    cars are those it scores (the candidates classified); `classify=False`: the detector's candidates alone."""

    predictor = copy.copy(predictor)
    predictor.max_cars = MAX_CARS  # every car, as served
    found, truths, widths, found_right, box_right = [], [], [], [], []
    scenes = composites.scenes_of(cfg, samples, "test", count, seed=0)
    for scene in tqdm(scenes, total=count, desc="test composites", disable=not cfg.runtime.progress, leave=False):
        image = as_uploaded(scene.image, predictor)
        prepared = [predictor.prepare(image)]
        cars = torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4)
        truths.append(cars)
        if not (classify and predictor.checks_cars):  # the detector's own candidates, as it ranks them
            found.append(detector_candidates(predictor, prepared, scene.image.width / image.width))
        if not classify:
            continue
        forward = predictor.run(prepared)  # its boxes are in the upload's pixels: the scene's
        rows = Found(
            torch.tensor(forward.boxes + forward.others.boxes, dtype=torch.float32),
            torch.cat([forward.car_scores.float(), torch.tensor(forward.others.scores)]),
        )
        classes = torch.cat([forward.logits, forward.others.logits]).argmax(1)
        if predictor.checks_cars:  # the candidates classified, ranked by their car scores
            found.append(rows)
        if not len(cars):
            continue
        labels = torch.tensor(scene.labels)
        widths.append(cars[:, 2] - cars[:, 0])
        to_image = image.width / scene.image.width
        true_cuts = torch.stack([predictor.cut_car(image, tuple(round(v * to_image) for v in b)) for b in scene.boxes])
        box_right.append(predictor.logits(true_cuts).argmax(1) == labels)
        answered = rows.scores >= predictor.calibration.car_threshold
        right = torch.zeros(len(cars), dtype=torch.bool)
        if answered.any():
            best = box_iou(rows.boxes[answered], cars).max(0)
            right = (best.values >= 0.5) & (classes[answered][best.indices] == labels)
        found_right.append(right)
    report = detection_metrics(found, truths, predictor.calibration.car_threshold)
    if not classify:
        return report
    widths, found_right, box_right = torch.cat(widths), torch.cat(found_right), torch.cat(box_right)
    for low, high in WIDTH_BINS:
        inside = (widths >= low) & (widths < high)
        name = f"{low}_{high}" if high < 100_000 else f"{low}_up"
        if inside.any():
            report[f"found_top1_{name}"] = round(float(found_right[inside].float().mean()), 4)
            report[f"true_box_top1_{name}"] = round(float(box_right[inside].float().mean()), 4)
    return report


def risk_coverage(confidence: Confidence) -> list[dict]:
    """Accuracy of the answers kept at each coverage, most confident first (every 5 %)."""
    order = np.argsort(-confidence.calibrated)
    kept = np.cumsum(confidence.correct[order]) / np.arange(1, len(order) + 1)
    points = []
    for coverage in np.arange(0.05, 1.0001, 0.05):
        n = max(1, round(coverage * len(order)))
        threshold = float(confidence.calibrated[order][n - 1])
        points.append(
            {
                "coverage": round(float(coverage), 2),
                "accuracy": round(float(kept[n - 1]), 4),
                "threshold": round(threshold, 4),
            }
        )
    return points


def corruption_metrics(predictor: Predictor, samples, cfg, clean_top1: float) -> dict:
    """The crops under each corruption at each severity (training/corruptions.py): top-1, ECE, the share
    of answers marked sure and how often those are right; and the mean top-1 as a share of the clean one."""
    crops, crop_to_bbox = data.view_samples(samples, "crops", cfg.data)
    results, top1 = {}, {}
    for name in corruptions.CORRUPTIONS:
        results[name], top1[name] = {}, {}
        for severity in corruptions.SEVERITIES:
            corrupt = functools.partial(corruptions.corrupt, name=name, severity=severity)
            outputs = predict(predictor, crops, cfg, crop_to_bbox, corruption=corrupt)
            answers, _ = answer_metrics(predictor, outputs)
            top1[name][severity] = float((outputs.logits.argmax(1) == outputs.labels).float().mean())
            results[name][str(severity)] = {
                "top1": round(top1[name][severity], 4),
                **{key: answers[key] for key in ("ece", "sure_coverage", "sure_accuracy", "no_car")},
            }
            log.info("%s %d: %s", name, severity, results[name][str(severity)])
    return {"by_corruption": results, "mean_top1_relative": round(corruptions.mean_relative_top1(top1, clean_top1), 4)}


def available_views(cfg, views=data.VIEWS) -> list[str]:
    """`views` that the dataset has: `photos` needs its photos/ folder."""
    return [v for v in views if v != "photos" or data.has_photos(cfg.data.data_root)]


def confusion_png(split: str, view: str) -> str:
    return f"confusion_{split}.png" if view == "crops" else f"confusion_{split}_{view}.png"


def reliability_png(split: str) -> str:
    return f"reliability_{split}.png"


def evaluate_view(predictor: Predictor, samples, cfg, view: str, split: str, out: Path) -> tuple[dict, Confidence]:
    """The metrics of one view of the held-out cars, and its confusion-matrix PNG in `out`."""
    view_samples, crop_to_bbox = data.view_samples(samples, view, cfg.data)
    outputs = predict(predictor, view_samples, cfg, crop_to_bbox, data.view_longest_side(view))
    metrics = compute_metrics(outputs.logits.numpy(), outputs.labels.numpy(), predictor.classes)
    answers, confidence = answer_metrics(predictor, outputs)
    metrics.update(answers)
    if outputs.boxes is not None and view == "photos":
        metrics.update(box_metrics(outputs.boxes, view_samples, cfg))
    matrix = metrics.pop("_confusion_matrix")
    with np.errstate(invalid="ignore"):
        plots.confusion_matrix(np.nan_to_num(matrix / matrix.sum(1, keepdims=True)), out / confusion_png(split, view))
    return metrics, confidence


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    overrides: dict | None = None,
    out: Path | None = None,
    views: list[str] | None = None,
    whole_image: bool = False,
    with_corruptions: bool = False,
    flip: bool = False,
) -> dict:
    """`run_dir`: a training run or an export. Writes eval_<split>.json and a confusion PNG per view into `out`.
    `whole_image`: classify the whole image even where the model has a box head (the chain without
    localising, for comparison). `with_corruptions`: the crops under ordinary photo conditions too.
    `flip`: each car classified mirrored too, as the server's `flip` setting does."""
    cfg, classes, model = load_trained(run_dir, overrides)
    if whole_image:
        cfg = config_lib.override(cfg, locate_size=0)
    views = views or available_views(cfg)
    if views[0] != "crops":
        views = ["crops", *[v for v in views if v != "crops"]]  # the top level of the metrics is the crops'
    samples = held_out_samples(cfg, run_dir, split)
    calibration = Calibration.load(run_dir / CALIBRATION)
    predictor = reference_predictor(model, cfg, classes, calibration)
    predictor.flip = flip
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    results, confidence = {}, {}
    for view in views:
        results[view], confidence[view] = evaluate_view(predictor, samples, cfg, view, split, out)
    plots.reliability(confidence, out / reliability_png(split), ECE_BINS)
    run = {
        "split": split,
        "eval_size": cfg.model.eval_size,
        "locate_size": cfg.model.locate_size,
        "detect_size": list(cfg.model.detect_size),
        "arch": cfg.model.arch,
        "flip": flip,
        "data_root": cfg.data.data_root,
        "calibration": dataclasses.asdict(calibration),
        "risk_coverage_crops": risk_coverage(confidence["crops"]),
    }
    if cfg.model.car_head or cfg.model.detects:
        run["no_car_test_set"] = no_car_metrics(predictor)
    if cfg.model.detects:
        run["detection"] = detection_test_metrics(predictor, cfg, samples)
    if with_corruptions:
        run["corruptions"] = corruption_metrics(predictor, samples, cfg, results["crops"]["top1"])
    metrics = {**run, **results["crops"], "views": results}
    (out / f"eval_{split}.json").write_text(json.dumps(metrics, indent=1))
    # logged to the training's run: the crops' figures as before, the other views' prefixed with their name.
    # An export is only read: its evaluation's run is recorded in `out`.
    record = out if (run_dir / MODEL_CONFIG).is_file() else run_dir
    with tracking.tracked(record, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        for view, result in results.items():
            prefix = f"{split}_" if view == "crops" else f"{split}_{view}_"
            keys = ("top1", "top5", "macro_f1", "num_images", "box_iou_mean", "box_iou_at_least_0.5", "ece")
            keys += ("make_accuracy", "no_car", "sure_coverage", "sure_accuracy")
            tracker.metrics({prefix + key: result[key] for key in keys if result.get(key) is not None})
        pngs = [out / confusion_png(split, view) for view in views] + [out / reliability_png(split)]
        tracker.artifacts(out / f"eval_{split}.json", *pngs, folder=f"eval_{split}")
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="training output directory (has config.yaml, best.pth)")
    source.add_argument("--export", help="an export directory (training.export's, e.g. models/efficientnet_lite0_cars)")
    parser.add_argument(
        "--views", nargs="+", choices=data.VIEWS, help="default: all (photos where the dataset has photos/)"
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", help="where to write eval_<split>.json and the PNG (default: the run directory)")
    parser.add_argument("--eval_size", type=int, help="override the evaluation image size")
    parser.add_argument("--data_root", help="override the dataset location recorded in the run")
    parser.add_argument(
        "--whole_image", action="store_true", help="classify whole images, without the box head (for comparison)"
    )
    parser.add_argument(
        "--corruptions",
        action="store_true",
        help="also the crops under low light, blur, noise, JPEG, downscaling and grayscale, 3 severities each",
    )
    parser.add_argument("--flip", action="store_true", help="classify each car mirrored too and average the two")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in {"eval_size": args.eval_size, "data_root": args.data_root}.items() if v is not None}
    try:
        folder = Path(args.run or args.export)
        out = Path(args.out) if args.out else None
        metrics = evaluate_run(
            folder, args.split, overrides, out, args.views, args.whole_image, args.corruptions, args.flip
        )
    except (FileNotFoundError, data.DatasetError, config_lib.ConfigError, tracking.TrackingError, ExportError) as err:
        return exit_with(err)
    for view, result in metrics["views"].items():
        print(
            f"{args.split} {view}: top1={result['top1']:.4f} top5={result['top5']:.4f} "
            f"macro_f1={result['macro_f1']:.4f} on {result['num_images']} images (eval_size={metrics['eval_size']})"
            + (f" box IoU mean={result['box_iou_mean']:.3f}" if "box_iou_mean" in result else "")
        )
    for pair in metrics["most_confused"][:5]:
        print(f"  {pair['count']}x {pair['true']} -> {pair['predicted']}")
    for name, by_severity in metrics.get("corruptions", {}).get("by_corruption", {}).items():
        figures = ", ".join(f"{s}: top1={r['top1']:.4f} ece={r['ece']:.3f}" for s, r in by_severity.items())
        print(f"{args.split} crops, {name}: {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
