"""Accuracy parity: held-out top-1 of the serving fast path vs the fp32 torch model.

    python bench/parity.py                                   # the shipped model, its test split
    python bench/parity.py --export exports/resnet50_cars --data_root /data/stanford_cars

Uses the export's own split.json, so the photos are ones the model never trained on. The fast
path may lose at most MAX_LOSS points of top-1 (the project's acceptance rule).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.fast_path import int8_model_path, make_runner, torch_runner  # noqa: E402
from handler.model import load_model  # noqa: E402
from training import config as config_lib  # noqa: E402
from training import data, presets  # noqa: E402
from training.evaluate import held_out_samples  # noqa: E402

MAX_LOSS = 0.005
BATCH = 32


def batches(samples, cfg):
    transform = presets.eval_preset(cfg)
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        images = torch.stack([transform(data.load_image(s, cfg.crop_to_bbox)) for s in chunk])
        yield images, torch.tensor([s.label for s in chunk])


def measure(export: Path, split: str, data_root: str | None) -> dict:
    overrides = {"data_root": data_root} if data_root else None
    cfg = config_lib.load(export / "config.yaml", overrides)
    model = load_model(export, export / f"{cfg.model_name}.pth", "cpu")
    int8 = int8_model_path(export, cfg.model_name)  # the handler serves it when the archive has it
    runners = {"fp32": torch_runner(model), "fast": make_runner(model, cfg.eval_size, int8_model=int8)}
    samples = held_out_samples(cfg, export, split)
    correct = dict.fromkeys(runners, 0)
    seconds = dict.fromkeys(runners, 0.0)
    agree = 0
    for images, labels in tqdm(batches(samples, cfg), total=-(-len(samples) // BATCH), desc=split):
        top1 = {}
        for name, runner in runners.items():
            started = time.perf_counter()
            top1[name] = runner.run(images).argmax(1)
            seconds[name] += time.perf_counter() - started
            correct[name] += int((top1[name] == labels).sum())
        agree += int((top1["fp32"] == top1["fast"]).sum())
    n = len(samples)
    fast = runners["fast"]
    return {
        "export": str(export),
        "split": split,
        "images": n,
        "fast_path": f"{fast.backend}/{fast.precision}",
        "top1_fp32": correct["fp32"] / n,
        "top1_fast": correct["fast"] / n,
        "top1_agreement": agree / n,
        "img_per_s_fp32": n / seconds["fp32"],
        "img_per_s_fast": n / seconds["fast"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=ROOT / "models" / "efficientnet_lite0_cars")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--data_root", help="override the dataset location recorded in the export")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = measure(args.export, args.split, args.data_root)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    loss = result["top1_fp32"] - result["top1_fast"]
    print(f"top-1 fp32 {result['top1_fp32']:.2%}, {result['fast_path']} {result['top1_fast']:.2%}: loss {loss:+.2%}")
    return 0 if loss <= MAX_LOSS else 1


if __name__ == "__main__":
    sys.exit(main())
