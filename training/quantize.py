"""Calibrate an int8 model for the CPU fast path and add it to an export.

Post-training quantization with NNCF on real training photos (never the held-out ones): the
export's network, converted to OpenVINO exactly as the handler converts it, is quantized and
saved next to the weights as ``<name>_int8.xml/.bin``. build-mar packs it; the handler serves
it when present (precision auto). Then the held-out top-1 of int8 vs fp32 is measured and
written to ``quantization.json``; a loss of more than ``--max_loss`` is an error and removes
the int8 files, so a bad calibration never ships.

A model with a box head runs twice per image (the whole photo at the locate size for the box,
the car cut from it at the eval size for the class), so it is calibrated on what the served chain
feeds it: crops and cars cut from whole training photos at the eval size, whole photos at the
locate size. Three parts stay in floating point (`float_scope`), chosen by how far int8 moved the
fp32 model's answers on training photos (docs/benchmarks.md, "int8 of the two-pass model"): the first
convolution (it sees the raw normalised pixels), the classifier's last layer, the box and car heads;
int8 everywhere else, with NNCF's full bias correction.

A model with a car detector gets a second int8 model for the detector's pass (`<name>_detector_int8`),
calibrated on the same photos and on training composites in the detector's canvas, its first convolution
and FCOS's three output layers in float. It is kept when its AP50 on test composites stays within
DETECTOR_MAX_LOSS of the float detector's and the whole int8 chain keeps the top-1 rule; when the chain
does not, it is dropped first (the detector then runs in bf16) and the classifier's int8 checked alone.

    python -m training.quantize --export models/efficientnet_lite0_cars
    python -m training.quantize --export exports/resnet50_cars --data_root /data/stanford_cars --images 600
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

from carmodel.errors import exit_with
from carmodel.export import QUANTIZATION, SPLIT, TRAINING_CONFIG, ExportDir, ExportError
from carmodel.models import DetectPass, spec
from carmodel.predictor import Predictor
from carmodel.runners import to_openvino
from training import config as config_lib
from training import data, model_card
from training.evaluate import available_views, compare_top1, held_out_samples

MAX_LOSS = 0.005  # the project's acceptance rule for a fast path: at most half a point of top-1
DETECTOR_MAX_LOSS = 0.01  # of AP50 on the test composites
DETECTOR_CHECK_SCENES = 100


class QuantizeError(RuntimeError):
    pass


def calibration_samples(cfg, count: int) -> list[data.Sample]:
    """`count` photos spread evenly over the training split (the same seeded split as training)."""
    samples = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)["train"]
    step = max(1, len(samples) // count)
    return samples[::step][:count]


def training_config(export: ExportDir, data_root: str | None):
    """The config the export was trained with (its data, split and loader settings)."""
    return config_lib.load(export.record(TRAINING_CONFIG), {"data_root": data_root} if data_root else None)


def check_against_fp32(export: ExportDir, cfg, max_loss: float, reference: Predictor) -> tuple[dict, list[str]]:
    """Held-out top-1 of the int8 chain vs fp32 (`reference`) in each view of the held-out cars (the
    crops, and the whole photos where the data has them), and what it lost beyond `max_loss`."""
    predictors = {
        "fp32": reference,
        "int8": Predictor.for_export(export, backend="openvino", precision="int8"),
    }
    held_out = held_out_samples(cfg, export.path, "test")  # checked against the export's split.json
    report, losses = {"held_out_images": len(held_out)}, []
    for view in available_views(cfg, ("crops", "photos")):
        samples, crop_to_bbox = data.view_samples(held_out, view, cfg.data)
        top1 = {name: r["top1"] for name, r in compare_top1(predictors, samples, cfg, crop_to_bbox).items()}
        suffix = "" if view == "crops" else f"_{view}"  # the crops' keys as they always were
        report |= {f"top1_fp32{suffix}": round(top1["fp32"], 4), f"top1_int8{suffix}": round(top1["int8"], 4)}
        if top1["fp32"] - top1["int8"] > max_loss:
            losses.append(
                f"{view}: int8 {top1['int8']:.2%} is {top1['fp32'] - top1['int8']:.2%} below fp32 {top1['fp32']:.2%}"
            )
    return report, losses


def chain_inputs(reference: Predictor, cfg, count: int) -> list[torch.Tensor]:
    """`count` training photos as the served chain feeds them to the network: without a box head,
    crops at the eval size; with one, half of them crops and the other half whole photos - each
    photo twice, at the locate size and as the car cut from it at the eval size. A detector's pass is
    another network (it stays in float): then only the cars at the eval size."""
    samples = calibration_samples(cfg, count)
    if not reference.localizes:
        return [reference.preprocess(data.load_image(s, cfg.data.crop_to_bbox)) for s in samples]
    crops = [data.load_image(s, cfg.data.crop_to_bbox) for s in samples[::2]]
    photos = [data.load_image(p, False) for p in data.uncropped(samples[1::2], cfg.data.data_root)]
    prepared = [reference.prepare(photo) for photo in photos]
    cars = reference.run(prepared).inputs
    located = [] if reference.config.detects else [p.tensor for p in prepared]
    return [reference.preprocess(crop) for crop in crops] + cars + located


def float_scope(ov_model, head: str):
    """What stays in floating point: the first convolution, the classifier's last layer (`head`,
    its attribute path) and the box and car heads; NNCF names them by the torch modules they came from."""
    import nncf

    ops = ov_model.get_ordered_ops()
    first_conv = next(op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution")
    head_ops = rf"__module\.(net\.)?{re.escape(head)}/.*"
    return nncf.IgnoredScope(names=[first_conv], patterns=[head_ops, r"__module\.(box|car)_head\..*"], validate=False)


def quantize(ov_model, inputs: list[torch.Tensor], head: str):
    import nncf

    ov_model.reshape([-1, 3, -1, -1])  # calibration inputs come at the eval size and, with a box head, the locate size
    return nncf.quantize(
        ov_model,
        nncf.Dataset([t.unsqueeze(0).numpy() for t in inputs]),
        subset_size=len(inputs),
        ignored_scope=float_scope(ov_model, head),
        fast_bias_correction=False,
    )


def detector_inputs(reference: Predictor, cfg, count: int) -> list[torch.Tensor]:
    """What the detector's pass is fed: whole training photos and training composites, on its canvas."""
    from training import composites

    samples = calibration_samples(cfg, count)
    photos = [data.load_image(p, False) for p in data.uncropped(samples[::2], cfg.data.data_root)]
    scenes = [s.image for s in composites.scenes_of(cfg, samples, "train", len(samples) // 2, seed=1)]
    return [reference.prepare(picture).tensor for picture in photos + scenes]


def detector_ap50(predictor: Predictor, cfg, held_out: list[data.Sample]) -> float:
    """AP50 of `predictor`'s detector on test composites (as training.evaluate measures it)."""
    from training.evaluate import detection_test_metrics

    return detection_test_metrics(predictor, cfg, held_out, DETECTOR_CHECK_SCENES, classify=False)["ap50"]


def quantize_detector(export: ExportDir, cfg, reference: Predictor, images: int, evaluate: bool) -> dict:
    """The detector's int8 model beside the weights; removed (and a float detector served) when it loses
    more than DETECTOR_MAX_LOSS of AP50."""
    import nncf
    import openvino as ov

    inputs = detector_inputs(reference, cfg, images)
    ov_model = to_openvino(DetectPass(reference.model), reference.config.detect_size)
    first_conv = next(
        op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() == "Convolution"
    )
    scope = nncf.IgnoredScope(names=[first_conv], patterns=[r".*(cls_logits|bbox_pred|bbox_ctrness).*"], validate=False)
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset([t.unsqueeze(0).numpy() for t in inputs]),
        subset_size=len(inputs),
        ignored_scope=scope,
        fast_bias_correction=False,
    )
    ov.save_model(quantized, export.detector_int8_xml, compress_to_fp16=False)
    report = {"calibration_inputs": len(inputs), "in_float": "first convolution, FCOS's output layers"}
    if not evaluate:
        return report
    held_out = held_out_samples(cfg, export.path, "test")
    int8 = Predictor.for_export(export, backend="openvino")  # auto: the detector's int8 model
    report |= {"ap50_fp32": detector_ap50(reference, cfg, held_out), "ap50_int8": detector_ap50(int8, cfg, held_out)}
    if report["ap50_fp32"] - report["ap50_int8"] > DETECTOR_MAX_LOSS:
        for path in export.detector_int8_files:
            path.unlink()
        report["kept"] = False
        logging.getLogger(__name__).warning("the detector's int8 model lost too much AP50: not kept %s", report)
    else:
        report["kept"] = True
    return report


def quantize_export(
    export: ExportDir,
    data_root: str | None,
    images: int,
    max_loss: float,
    evaluate: bool = True,
) -> dict:
    import openvino as ov

    cfg = training_config(export, data_root)
    reference = Predictor.for_export(export, backend="torch")
    detector = quantize_detector(export, cfg, reference, images, evaluate) if reference.config.detects else None
    inputs = chain_inputs(reference, cfg, images)

    started = time.perf_counter()
    ov_model = to_openvino(reference.model, reference.config.eval_size)
    quantized = quantize(ov_model, inputs, spec(reference.config.arch).head)
    seconds = time.perf_counter() - started
    ov.save_model(quantized, export.int8_xml, compress_to_fp16=False)
    report = {
        "calibration_images": images,
        "calibration_inputs": len(inputs),
        "calibration_split": "train",
        "in_float": "first convolution, classifier head, box and car heads",
        "seconds": round(seconds, 1),
    } | ({"detector": detector} if detector else {})
    if evaluate:
        checked, losses = check_against_fp32(export, cfg, max_loss, reference)
        if losses and export.has_detector_int8:  # the detector's int8 boxes may be what cost it: served in float
            for path in export.detector_int8_files:
                path.unlink()
            detector |= {"kept": False, "chain_with_it": checked, "lost": losses}
            checked, losses = check_against_fp32(export, cfg, max_loss, reference)
        if losses:
            for path in export.int8_files:
                path.unlink()
            raise QuantizeError(f"int8 top-1 lost more than {max_loss:.2%}: {'; '.join(losses)}: not kept")
        report.update(checked)
    export.record(QUANTIZATION).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="training.export output directory")
    parser.add_argument("--data_root", help="the dataset (default: the export's config.yaml data_root)")
    parser.add_argument("--images", type=int, default=1200, help="training photos to calibrate on")
    parser.add_argument("--max_loss", type=float, default=MAX_LOSS, help="largest top-1 loss allowed vs fp32")
    parser.add_argument("--no_evaluate", action="store_true", help="skip the held-out int8 vs fp32 check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export = ExportDir(Path(args.export))
    try:
        if not export.record(TRAINING_CONFIG).is_file() or not export.record(SPLIT).is_file():
            raise QuantizeError(f"{export.path} is not a training.export directory (needs config.yaml and split.json)")
        report = quantize_export(export, args.data_root, args.images, args.max_loss, not args.no_evaluate)
    except (QuantizeError, ExportError, data.DatasetError, config_lib.ConfigError) as err:
        return exit_with(err)
    model_card.write(export.path)  # the card gains the int8 figures
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
