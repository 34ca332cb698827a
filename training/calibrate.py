"""Fit how far the answer can be trusted, on the val split: the temperature, and the thresholds of
"no car" and "not sure" (carmodel/calibration.py). Writes calibration.json into the run (the export
ships it); test is never looked at.

* Temperature T(s) = T0 * (s / 224) ** a * exp(w.z + v.z^2), `s` the classified region's size in pixels
  and z its image quality (carmodel.calibration.image_quality, standardised on the clean val crops),
  fitted by log-likelihood over the val cars in every view (crops, whole photos, thumbnails) and over
  the val crops shrunk to 112-224 px (half the eval size to all of it) and put through training's photo
  conditions (dusk, blur, grain, JPEG, faded colour) at the scale training applies them: a thumbnail's
  car, a dark photo's and a sharp crop's do not deserve the same confidence.
  `--single_temperature` fits T0 alone, `--no_quality` leaves the quality out.
* car_threshold: the highest car score that flags at most `--max_no_car` of the val cars as "no car"
  in any view. With a detector whose cars the car head checks, detect_threshold first: the highest
  detector score that leaves a quarter of that share of the val cars unclassified; then the car
  threshold over the car scores of the rest.
* sure_threshold: the lowest top-1 probability at and above which the val answers are right at least
  `--sure_accuracy` of the time in every view (crops, whole photos, thumbnails); make_threshold the same for
  the make and its summed probability.

A model fitted on train+val has no val cars left to be calibrated on: it takes over (`--fitted_on`) the
calibration of the same recipe fitted on train alone, whose val answers it was fitted on; the test
split then shows whether it still holds.

    python -m training.calibrate --run runs/efficientnet_lite0_photos
    python -m training.calibrate --run runs/efficientnet_lite0_final --fitted_on runs/efficientnet_lite0_photos
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from carmodel.calibration import CALIBRATION, QUALITY, Calibration
from carmodel.detection import PROVISIONAL_THRESHOLD, SCORE_FLOOR
from carmodel.errors import exit_with
from carmodel.presets import Downscale, photo_conditions
from training import config as config_lib
from training import data, tracking
from training.evaluate import (
    Outputs,
    available_views,
    expected_calibration_error,
    load_trained,
    predict,
    reference_predictor,
)

log = logging.getLogger(__name__)


def fit_temperature(
    outputs: list[Outputs],
    reference_side: float,
    size_dependent: bool = True,
    clean: Outputs | None = None,
) -> Calibration:
    """T0 (and the size exponent; with `clean`, the crops whose image quality is the reference, the
    quality's weights too) that maximise the likelihood of the labels over `outputs`."""
    logits = torch.cat([o.logits for o in outputs]).float()
    labels = torch.cat([o.labels for o in outputs])
    sides = torch.cat([o.sides for o in outputs])
    log_t0 = torch.zeros(1, requires_grad=True)
    exponent = torch.zeros(1, requires_grad=size_dependent)
    features = len(QUALITY) if clean is not None else 0
    weights, square_weights = torch.zeros(features, requires_grad=True), torch.zeros(features, requires_grad=True)
    quality_mean = clean.quality.mean(0) if clean is not None else torch.zeros(0)
    quality_scale = clean.quality.std(0).clamp_min(1e-3) if clean is not None else torch.ones(0)
    z = (torch.cat([o.quality for o in outputs])[:, :features] - quality_mean) / quality_scale
    z = z.clamp(-6, 6)
    relative = torch.log(sides / reference_side)
    fitted = [log_t0] + [exponent] * size_dependent + [weights, square_weights] * bool(features)
    optimizer = torch.optim.LBFGS(fitted, lr=0.5, max_iter=200)

    def nll():
        optimizer.zero_grad()
        # held to 1e-4..1e4: a model near chance would otherwise send T, and the line search's step, to infinity
        log_temperature = log_t0 + exponent * relative + z @ weights + z.square() @ square_weights
        temperature = torch.exp(log_temperature.clamp(-9.2, 9.2))
        loss = torch.nn.functional.cross_entropy(logits / temperature.unsqueeze(1), labels)
        loss.backward()
        return loss

    optimizer.step(nll)

    def listed(values: torch.Tensor) -> tuple[float, ...]:
        return tuple(round(float(v), 5) for v in values.detach())

    return Calibration(
        temperature=float(torch.exp(log_t0.detach())),
        size_exponent=float(exponent.detach()),
        reference_side=reference_side,
        min_side=float(sides.min()),
        max_side=float(sides.max()),
        quality_mean=listed(quality_mean),
        quality_scale=listed(quality_scale),
        quality_weights=listed(weights),
        quality_square_weights=listed(square_weights),
    )


def in_photo_conditions(
    seed: int | None = None, longest_sides: tuple[int, int] | None = None
) -> Callable[[Image.Image], Image.Image]:
    """Training's photo conditions (carmodel.presets.photo_conditions) on a PIL image, reproducibly
    from `seed` on (None: torch's generator as it stands): a dark, blurred or grainy photo of it.
    With `longest_sides` (low, high), the image is first shrunk (never enlarged) to a random longer side
    in that range: the conditions then act at the scale training applies them, after its crop to about
    the network's input size."""
    conditions = photo_conditions()
    shrink = Downscale(1.0, longest_sides) if longest_sides is not None else (lambda tensor: tensor)
    if seed is not None:
        torch.manual_seed(seed)

    def alter(image: Image.Image) -> Image.Image:
        tensor = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        return F.to_pil_image(conditions(shrink(tensor)).clamp(0, 1))

    return alter


def sure_threshold(confidence: np.ndarray, correct: np.ndarray, accuracy: float) -> float:
    """The lowest confidence threshold whose answers at or above it are right at least `accuracy` of
    the time: the most answers marked sure at that accuracy. 1.0 where no threshold gets there."""
    order = np.argsort(-confidence)
    kept_accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    passing = np.nonzero(kept_accuracy >= accuracy)[0]
    return float(confidence[order][passing[-1]]) if len(passing) else 1.0


def car_threshold(scores_by_view: dict[str, np.ndarray], max_flagged: float) -> float:
    """The highest threshold that flags at most `max_flagged` of the cars of each view."""
    return float(min(np.quantile(scores, max_flagged, method="lower") for scores in scores_by_view.values()))


CALIBRATION_FROM = "calibration_from.json"  # in a run whose calibration was taken over: the run it came from
CONDITIONS = "crops_in_photo_conditions"  # the val crops, shrunk, through training's photo conditions

# At most 1 % of cars may be called "no car"; flagging 0.75 % of val's leaves room for val and test to differ.
MAX_NO_CAR = 0.0075


def calibrate_run(
    run_dir: Path,
    max_no_car: float = MAX_NO_CAR,
    sure_accuracy: float = 0.975,
    single_temperature: bool = False,
    quality: bool = True,
) -> tuple[Calibration, dict]:
    cfg, classes, model = load_trained(run_dir, {"progress": False})
    # a detector's answer is its most prominent car among those above the car threshold: until that is
    # fitted (on the cars' best scores, which do not depend on it), a provisional one picks them
    provisional = Calibration(car_threshold=PROVISIONAL_THRESHOLD) if cfg.model.detects else None
    predictor = reference_predictor(model, cfg, classes, provisional)
    if cfg.data.fit_on == "train+val":
        raise ValueError(
            f"{run_dir} was fitted on train+val: no val cars are left to calibrate on; take over the calibration "
            "of the same recipe on train alone with --fitted_on"
        )
    val = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)["val"]
    outputs = {}
    for view in available_views(cfg):
        view_samples, crop_to_bbox = data.view_samples(val, view, cfg.data)
        outputs[view] = predict(predictor, view_samples, cfg, crop_to_bbox, data.view_longest_side(view))
    # at the scale the network sees them (training applies them after its crop), on cars of half its input
    # size to all of it: small enough to be seen blurred or grainy, without making the size stand for the damage
    sides = (cfg.model.eval_size // 2, cfg.model.eval_size)
    outputs[CONDITIONS] = predict(predictor, val, cfg, corruption=in_photo_conditions(cfg.runtime.seed, sides))
    views = list(outputs.values())
    fitted = fit_temperature(views, cfg.model.eval_size, not single_temperature, outputs["crops"] if quality else None)
    fitted_on = f"val split, {len(val)} cars"
    calibration = thresholded(fitted, predictor, outputs, max_no_car, sure_accuracy, fitted_on)
    report = {view: view_report(calibration, o) for view, o in outputs.items()}
    if quality:  # what the image quality's part of the temperature does, on val
        size_only = fit_temperature(views, cfg.model.eval_size, not single_temperature)
        size_only = thresholded(size_only, predictor, outputs, max_no_car, sure_accuracy, fitted_on)
        report["without_quality"] = {view: view_report(size_only, o) for view, o in outputs.items()}
    calibration.save(run_dir / CALIBRATION)
    with tracking.tracked(run_dir, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        tracker.metrics({f"val_{view}_ece": report[view]["ece"] for view in outputs})
        tracker.artifacts(run_dir / CALIBRATION)
    return calibration, report


def carry_over(run_dir: Path, fitted_on: Path) -> Calibration:
    """`fitted_on`'s calibration (a run of the same recipe on train alone), written into `run_dir`."""
    source = fitted_on / CALIBRATION
    if not source.is_file():
        raise FileNotFoundError(f"{source}: calibrate that run first (training.calibrate --run {fitted_on})")
    calibration = Calibration.load(source)
    calibration = dataclasses.replace(
        calibration, fitted_on=f"{calibration.fitted_on}, of {fitted_on.name} (train alone)"
    )
    calibration.save(run_dir / CALIBRATION)
    (run_dir / CALIBRATION_FROM).write_text(json.dumps(run_record(fitted_on), indent=1))
    return calibration


def run_record(run_dir: Path) -> dict:
    """Where a carried-over calibration came from, and what that run cost (the model card's training time)."""
    record = {"run": str(run_dir)}
    reports = {"training": "train_summary.json", "detector": "detector.json", "car_check": "verifier.json"}
    for key, name in reports.items():
        if (run_dir / name).is_file():
            record[key] = json.loads((run_dir / name).read_text())
    return record


def thresholded(
    fitted: Calibration,
    predictor,
    outputs: dict[str, Outputs],
    max_no_car: float,
    sure_accuracy: float,
    fitted_on: str,
) -> Calibration:
    """`fitted`'s temperature with the thresholds it gives on the val `outputs`: "sure" and the make's the
    lowest that keep the sure answers right `sure_accuracy` of the time in every view people send (crops,
    whole photos, thumbnails: the promise holds whatever the photo), the car's over those views too."""
    predictor.calibration = fitted
    sent = {view: o for view, o in outputs.items() if view != CONDITIONS}
    sure, make = [], []
    for o in sent.values():
        probabilities = fitted.probabilities(o.logits, o.sides, o.quality)
        top1, predicted = probabilities.max(1)
        sure.append(sure_threshold(top1.numpy(), (predicted == o.labels).numpy(), sure_accuracy))
        shares = predictor.shares(probabilities, predictor.make_of, predictor.makes)
        right = np.array([m.name == predictor.vehicles[int(y)].make for m, y in zip(shares, o.labels, strict=True)])
        make.append(sure_threshold(np.array([m.probability for m in shares]), right, sure_accuracy))
    thresholds = {"sure_threshold": max(sure), "make_threshold": max(make)}
    if outputs["crops"].detect_scores is not None and predictor.checks_cars:
        detected = {v: o.detect_scores.numpy() for v, o in sent.items()}
        # never below the detector's floor (no candidate is under it); 0 would mean "none fitted"
        thresholds["detect_threshold"] = max(car_threshold(detected, max_no_car / 4), SCORE_FLOOR)
        classified = {v: d >= thresholds["detect_threshold"] for v, d in detected.items()}
        scores = {v: np.where(classified[v], o.car_scores.numpy(), 0.0) for v, o in sent.items()}
        thresholds["car_threshold"] = car_threshold(scores, max_no_car)
    elif outputs["crops"].car_scores is not None:
        thresholds["car_threshold"] = car_threshold({v: o.car_scores.numpy() for v, o in sent.items()}, max_no_car)
    return dataclasses.replace(fitted, **thresholds, fitted_on=fitted_on)


def view_report(calibration: Calibration, outputs: Outputs) -> dict:
    """ECE before and after, and the answers marked sure, on one view."""
    correct = (outputs.logits.argmax(1) == outputs.labels).numpy()
    before = torch.softmax(outputs.logits.float(), 1).max(1).values.numpy()
    after = calibration.probabilities(outputs.logits, outputs.sides, outputs.quality).max(1).values.numpy()
    sure = after >= calibration.sure_threshold
    return {
        "top1": round(float(correct.mean()), 4),
        "ece_uncalibrated": round(expected_calibration_error(before, correct), 4),
        "ece": round(expected_calibration_error(after, correct), 4),
        "mean_top1_probability": round(float(after.mean()), 4),
        "sure_share": round(float(sure.mean()), 4),
        "sure_right": round(float(correct[sure].mean()), 4) if sure.any() else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished training run (or an export) fitted on train alone")
    parser.add_argument(
        "--fitted_on", help="take this run's calibration over (the same recipe on train alone) instead of fitting"
    )
    parser.add_argument(
        "--max_no_car", type=float, default=MAX_NO_CAR, help="share of val cars the car threshold may flag"
    )
    parser.add_argument(
        "--sure_accuracy", type=float, default=0.975, help="accuracy of the answers marked sure, on val"
    )
    parser.add_argument("--single_temperature", action="store_true", help="one temperature, whatever the car's size")
    parser.add_argument("--no_quality", action="store_true", help="a temperature that ignores the image's quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.fitted_on:
            calibration = carry_over(Path(args.run), Path(args.fitted_on))
            print(json.dumps({"calibration": dataclasses.asdict(calibration)}, indent=1))
            return 0
        calibration, report = calibrate_run(
            Path(args.run), args.max_no_car, args.sure_accuracy, args.single_temperature, not args.no_quality
        )
    except (FileNotFoundError, ValueError, data.DatasetError, config_lib.ConfigError, tracking.TrackingError) as err:
        return exit_with(err)
    print(json.dumps({"calibration": dataclasses.asdict(calibration), "val": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
