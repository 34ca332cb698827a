"""Fit how far the answer can be trusted, on the val split: the temperature, and the thresholds of
"no car" and "not sure" (carmodel/calibration.py). Writes calibration.json into the run (the export
ships it); test is never looked at.

* Temperature T(s) = T0 * (s / 224) ** a, `s` the classified region's size in pixels, fitted by
  log-likelihood over the val cars in every view (crops, whole photos, thumbnails): a thumbnail's car
  and a photo's crop do not deserve the same confidence. `--single_temperature` fits T0 alone.
* car_threshold: the highest car score that flags at most `--max_no_car` of the val cars as "no car"
  in any view.
* sure_threshold: the lowest top-1 probability at and above which the val crops' answers are right at
  least `--sure_accuracy` of the time; make_threshold the same for the make and its summed probability.

    python -m training.calibrate --run runs/efficientnet_lite0_photos
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from carmodel.calibration import CALIBRATION, Calibration
from carmodel.errors import exit_with
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


def fit_temperature(outputs: list[Outputs], reference_side: float, size_dependent: bool = True) -> Calibration:
    """T0 (and the size exponent) that maximise the likelihood of the labels over `outputs`."""
    logits = torch.cat([o.logits for o in outputs]).float()
    labels = torch.cat([o.labels for o in outputs])
    sides = torch.cat([o.sides for o in outputs])
    log_t0 = torch.zeros(1, requires_grad=True)
    exponent = torch.zeros(1, requires_grad=size_dependent)
    relative = torch.log(sides / reference_side)
    optimizer = torch.optim.LBFGS([log_t0, exponent] if size_dependent else [log_t0], lr=0.5, max_iter=200)

    def nll():
        optimizer.zero_grad()
        temperature = torch.exp(log_t0 + exponent * relative).unsqueeze(1)
        loss = torch.nn.functional.cross_entropy(logits / temperature, labels)
        loss.backward()
        return loss

    optimizer.step(nll)
    return Calibration(
        temperature=float(torch.exp(log_t0.detach())),
        size_exponent=float(exponent.detach()),
        reference_side=reference_side,
        min_side=float(sides.min()),
        max_side=float(sides.max()),
    )


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


# At most 1 % of cars may be called "no car"; flagging 0.75 % of val's leaves room for val and test to differ.
MAX_NO_CAR = 0.0075


def calibrate_run(
    run_dir: Path,
    max_no_car: float = MAX_NO_CAR,
    sure_accuracy: float = 0.975,
    single_temperature: bool = False,
) -> tuple[Calibration, dict]:
    cfg, classes, model = load_trained(run_dir, {"progress": False})
    predictor = reference_predictor(model, cfg, classes)
    val = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)["val"]
    if not val:
        raise ValueError(f"{run_dir} was fitted on train+val: no val cars are left to calibrate on")
    outputs = {}
    for view in available_views(cfg):
        view_samples, crop_to_bbox = data.view_samples(val, view, cfg.data)
        outputs[view] = predict(predictor, view_samples, cfg, crop_to_bbox, data.view_longest_side(view))
    fitted = fit_temperature(list(outputs.values()), cfg.model.eval_size, not single_temperature)
    predictor.calibration = fitted
    crops = outputs["crops"]
    probabilities = fitted.probabilities(crops.logits, crops.sides)
    top1, predicted = probabilities.max(1)
    make = predictor.shares(probabilities, predictor.make_of, predictor.makes)
    make_correct = np.array(
        [m.name == predictor.vehicles[int(y)].make for m, y in zip(make, crops.labels, strict=True)]
    )
    thresholds = {
        "sure_threshold": sure_threshold(top1.numpy(), (predicted == crops.labels).numpy(), sure_accuracy),
        "make_threshold": sure_threshold(np.array([m.probability for m in make]), make_correct, sure_accuracy),
    }
    if crops.car_scores is not None:
        scores = {view: o.car_scores.numpy() for view, o in outputs.items()}
        thresholds["car_threshold"] = car_threshold(scores, max_no_car)
    calibration = dataclasses.replace(fitted, **thresholds, fitted_on=f"val split, {len(val)} cars")
    report = {view: view_report(calibration, o) for view, o in outputs.items()}
    calibration.save(run_dir / CALIBRATION)
    with tracking.tracked(run_dir, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        tracker.metrics({f"val_{view}_ece": r["ece"] for view, r in report.items()})
        tracker.artifacts(run_dir / CALIBRATION)
    return calibration, report


def view_report(calibration: Calibration, outputs: Outputs) -> dict:
    """ECE before and after, on one view."""
    correct = (outputs.logits.argmax(1) == outputs.labels).numpy()
    before = torch.softmax(outputs.logits.float(), 1).max(1).values.numpy()
    after = calibration.probabilities(outputs.logits, outputs.sides).max(1).values.numpy()
    return {
        "top1": round(float(correct.mean()), 4),
        "ece_uncalibrated": round(expected_calibration_error(before, correct), 4),
        "ece": round(expected_calibration_error(after, correct), 4),
        "mean_top1_probability": round(float(after.mean()), 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished training run (or an export) fitted on train alone")
    parser.add_argument(
        "--max_no_car", type=float, default=MAX_NO_CAR, help="share of val cars the car threshold may flag"
    )
    parser.add_argument(
        "--sure_accuracy", type=float, default=0.975, help="accuracy of the answers marked sure, on val"
    )
    parser.add_argument("--single_temperature", action="store_true", help="one temperature, whatever the car's size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        calibration, report = calibrate_run(
            Path(args.run), args.max_no_car, args.sure_accuracy, args.single_temperature
        )
    except (FileNotFoundError, ValueError, data.DatasetError, config_lib.ConfigError, tracking.TrackingError) as err:
        return exit_with(err)
    print(json.dumps({"calibration": dataclasses.asdict(calibration), "val": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
