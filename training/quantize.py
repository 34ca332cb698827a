"""Calibrate an int8 model for the CPU fast path and add it to an export.

Post-training quantization with NNCF on real training photos (never the held-out ones): the
export's network, converted to OpenVINO exactly as the handler converts it, is quantized and
saved next to the weights as ``<name>_int8.xml/.bin``. build-mar packs it; the handler serves
it when present (precision auto). Then the held-out top-1 of int8 vs fp32 is measured and
written to ``quantization.json``; a loss of more than ``--max_loss`` is an error and removes
the int8 files, so a bad calibration never ships.

    python -m training.quantize --export models/efficientnet_lite0_cars
    python -m training.quantize --export exports/resnet50_cars --data_root /data/stanford_cars --images 600
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from carmodel.export import QUANTIZATION, SPLIT, TRAINING_CONFIG, ExportDir, ExportError
from carmodel.predictor import Predictor
from carmodel.runners import to_openvino
from training import config as config_lib
from training import data
from training.evaluate import compare_top1, held_out_samples

MAX_LOSS = 0.005  # the project's acceptance rule for a fast path: at most half a point of top-1


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


def check_against_fp32(export: ExportDir, cfg, max_loss: float, reference: Predictor) -> dict:
    """Held-out top-1 of the int8 model vs fp32 (`reference`); removes the int8 files and raises if it lost too much."""
    predictors = {
        "fp32": reference,
        "int8": Predictor.for_export(export, backend="openvino", precision="int8"),
    }
    held_out = held_out_samples(cfg, export.path, "test")  # checked against the export's split.json
    top1 = {name: result["top1"] for name, result in compare_top1(predictors, held_out, cfg).items()}
    if top1["fp32"] - top1["int8"] > max_loss:
        for path in export.int8_files:
            path.unlink()
        raise QuantizeError(
            f"int8 top-1 {top1['int8']:.2%} is {top1['fp32'] - top1['int8']:.2%} below fp32 {top1['fp32']:.2%} "
            f"(allowed {max_loss:.2%}): not kept"
        )
    return {"held_out_images": len(held_out), "top1_fp32": round(top1["fp32"], 4), "top1_int8": round(top1["int8"], 4)}


def quantize_export(
    export: ExportDir, data_root: str | None, images: int, max_loss: float, evaluate: bool = True
) -> dict:
    import nncf
    import openvino as ov

    cfg = training_config(export, data_root)
    reference = Predictor.for_export(export, backend="torch")
    calib = calibration_samples(cfg, images)
    tensors = [reference.preprocess(data.load_image(s, cfg.data.crop_to_bbox)).unsqueeze(0).numpy() for s in calib]

    started = time.perf_counter()
    ov_model = to_openvino(reference.model, reference.config.eval_size)
    quantized = nncf.quantize(ov_model, nncf.Dataset(tensors), subset_size=len(tensors))
    seconds = time.perf_counter() - started
    ov.save_model(quantized, export.int8_xml, compress_to_fp16=False)
    report = {"calibration_images": len(tensors), "calibration_split": "train", "seconds": round(seconds, 1)}
    if evaluate:
        report.update(check_against_fp32(export, cfg, max_loss, reference))
    export.record(QUANTIZATION).write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="training.export output directory")
    parser.add_argument("--data_root", help="the dataset (default: the export's config.yaml data_root)")
    parser.add_argument("--images", type=int, default=600, help="training photos to calibrate on")
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
