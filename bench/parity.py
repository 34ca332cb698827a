"""Accuracy parity: held-out top-1 of the serving fast path vs the fp32 torch model.

    python -m bench.parity                                   # the shipped model, its test split
    python -m bench.parity --export exports/resnet50_cars --data_root /data/stanford_cars

Uses the export's own split.json, so the photos are ones the model never trained on. Both sides
are carmodel Predictors built from the export: "fp32" the eager torch model, "fast" what the
handler serves by default (the int8 model when the export has one). The fast path may lose at
most training.quantize.MAX_LOSS of top-1 (the project's acceptance rule, the one int8
calibration is held to).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import MODELS_DIR
from carmodel.export import ExportDir
from carmodel.paths import DEFAULT_MODEL
from carmodel.predictor import Predictor
from training import data
from training.evaluate import available_views, compare_top1, held_out_samples
from training.quantize import MAX_LOSS, training_config


def measure(export: ExportDir, split: str, data_root: str | None) -> dict:
    cfg = training_config(export, data_root)  # the export's data, split and loader settings
    predictors = {"fp32": Predictor.for_export(export, backend="torch"), "fast": Predictor.for_export(export)}
    held_out = held_out_samples(cfg, export.path, split)
    fast = predictors["fast"].runner
    report = {"export": str(export.path), "split": split, "fast_path": f"{fast.backend}/{fast.precision}", "views": {}}
    for view in available_views(cfg, ("crops", "photos")):
        samples, crop_to_bbox = data.view_samples(held_out, view, cfg.data)
        result = compare_top1(predictors, samples, cfg, crop_to_bbox)
        report["views"][view] = {
            "images": len(samples),
            "top1_fp32": result["fp32"]["top1"],
            "top1_fast": result["fast"]["top1"],
            "top1_agreement": result["fast"]["agreement"],
            "img_per_s_fp32": result["fp32"]["img_per_s"],
            "img_per_s_fast": result["fast"]["img_per_s"],
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=MODELS_DIR / DEFAULT_MODEL)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--data_root", help="override the dataset location recorded in the export")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = measure(ExportDir(args.export), args.split, args.data_root)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    worst = 0.0
    for view, figures in result["views"].items():
        loss = figures["top1_fp32"] - figures["top1_fast"]
        worst = max(worst, loss)
        print(
            f"{view}: top-1 fp32 {figures['top1_fp32']:.2%}, {result['fast_path']} {figures['top1_fast']:.2%}: "
            f"loss {loss:+.2%}"
        )
    return 0 if worst <= MAX_LOSS else 1


if __name__ == "__main__":
    sys.exit(main())
