"""Calibrate an int8 model for the CPU fast path and add it to an export.

Post-training quantization with NNCF on real training photos (never the held-out ones): the
export's network, converted to OpenVINO exactly as the handler converts it, is quantized and
saved next to the weights as ``<name>_int8.xml/.bin``. build_mar.py packs it; the handler serves
it when present (precision auto). Then the held-out top-1 of int8 vs fp32 is measured and
written to ``quantization.json``; a loss of more than ``--max_loss`` is an error and removes
the int8 files, so a bad calibration never ships.

    python -m training.quantize --export models/efficientnet_lite0_cars
    python -m training.quantize --export exports/resnet50_cars --data_root /data/stanford_cars --images 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from handler.fast_path import int8_model_path, openvino_runner, to_openvino, torch_runner
from handler.model import load_model
from training import config as config_lib
from training import data, presets
from training.evaluate import held_out_samples
from training.train import make_loader

MAX_LOSS = 0.005  # the project's acceptance rule for a fast path: at most half a point of top-1


class QuantizeError(RuntimeError):
    pass


def calibration_samples(cfg, count: int) -> list[data.Sample]:
    """`count` photos spread evenly over the training split (the same seeded split as training)."""
    samples = data.make_splits(data.scan(cfg.data_root, cfg.layout), cfg)["train"]
    step = max(1, len(samples) // count)
    return samples[::step][:count]


def held_out_top1(runners: dict, samples, cfg) -> dict[str, float]:
    """Top-1 of each runner over the same photos, each photo decoded once."""
    loader = make_loader(data.CarsDataset(samples, presets.eval_preset(cfg), cfg.crop_to_bbox), cfg, shuffle=False)
    correct = dict.fromkeys(runners, 0)
    for images, labels in loader:
        for name, runner in runners.items():
            correct[name] += int((runner.run(images).argmax(1) == labels).sum())
    return {name: hits / max(1, len(samples)) for name, hits in correct.items()}


def quantize_export(export: Path, data_root: str | None, images: int, max_loss: float, evaluate: bool = True) -> dict:
    import nncf
    import openvino as ov

    cfg = config_lib.load(export / "config.yaml")
    if data_root:
        cfg = dataclasses.replace(cfg, data_root=data_root)
    model = load_model(export, export / f"{cfg.model_name}.pth", "cpu")
    transform = presets.eval_preset(cfg)
    calib = calibration_samples(cfg, images)
    tensors = [transform(data.load_image(s, cfg.crop_to_bbox)).unsqueeze(0).numpy() for s in calib]

    started = time.perf_counter()
    quantized = nncf.quantize(to_openvino(model, cfg.eval_size), nncf.Dataset(tensors), subset_size=len(tensors))
    seconds = time.perf_counter() - started
    target = int8_model_path(export, cfg.model_name)
    ov.save_model(quantized, target, compress_to_fp16=False)
    report = {"calibration_images": len(tensors), "calibration_split": "train", "seconds": round(seconds, 1)}

    if evaluate:
        held_out = held_out_samples(cfg, export, "test")  # checked against the export's split.json
        runners = {"fp32": torch_runner(model), "int8": openvino_runner(model, cfg.eval_size, "int8", target)}
        fp32, int8 = held_out_top1(runners, held_out, cfg).values()
        report.update(held_out_images=len(held_out), top1_fp32=round(fp32, 4), top1_int8=round(int8, 4))
        if fp32 - int8 > max_loss:
            target.unlink()
            target.with_suffix(".bin").unlink()
            raise QuantizeError(
                f"int8 top-1 {int8:.2%} is {fp32 - int8:.2%} below fp32 {fp32:.2%} (allowed {max_loss:.2%}): not kept"
            )
    (export / "quantization.json").write_text(json.dumps(report, indent=1))
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
    export = Path(args.export)
    try:
        if not (export / "config.yaml").is_file() or not (export / "split.json").is_file():
            raise QuantizeError(f"{export} is not a training.export directory (needs config.yaml and split.json)")
        report = quantize_export(export, args.data_root, args.images, args.max_loss, not args.no_evaluate)
    except (QuantizeError, data.DatasetError, config_lib.ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
