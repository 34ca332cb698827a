"""Fast decode vs full decode: the held-out cars re-encoded at `--scale` times their size (JPEG q90),
each classified twice through the served chain - decoded at full size, and decoded as the server
decodes (carmodel.images: DCT scaling and reduce to the model's decode side) - top-1 of each and the
decoding time, per view (crops, whole photos).

    python -m bench.decode_parity
    python -m bench.decode_parity --export models/efficientnet_lite0_cars --scale 4 --views crops photos
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from bench.common import BENCH_VAR, MODELS_DIR, timestamp
from carmodel.export import ExportDir
from carmodel.images import ImageLimits, decode_image
from carmodel.paths import DEFAULT_MODEL
from carmodel.predictor import Predictor
from training import data
from training.evaluate import available_views, held_out_samples
from training.quantize import training_config

QUALITY = 90
BATCH = 16


def enlarged_jpeg(sample: data.Sample, crop_to_bbox: bool, scale: int) -> bytes:
    image = data.load_image(sample, crop_to_bbox)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=QUALITY)
    return buffer.getvalue()


def compare_view(predictor: Predictor, samples, crop_to_bbox: bool, scale: int) -> dict:
    decodes = {"full": 0, "fast": predictor.decode_side}
    correct, seconds, agree = dict.fromkeys(decodes, 0), dict.fromkeys(decodes, 0.0), 0
    limits = ImageLimits()
    for start in tqdm(range(0, len(samples), BATCH), leave=False):
        chunk = samples[start : start + BATCH]
        bodies = [enlarged_jpeg(s, crop_to_bbox, scale) for s in chunk]
        top1 = {}
        for name, side in decodes.items():
            started = time.perf_counter()
            images = [decode_image(body, limits, side) for body in bodies]
            seconds[name] += time.perf_counter() - started
            top1[name] = predictor.forward(images).logits.argmax(1).tolist()
            correct[name] += sum(t == s.label for t, s in zip(top1[name], chunk, strict=True))
        agree += sum(a == b for a, b in zip(top1["full"], top1["fast"], strict=True))
    n = len(samples)
    return {
        "images": n,
        "top1_full_decode": round(correct["full"] / n, 4),
        "top1_fast_decode": round(correct["fast"] / n, 4),
        "same_top1": round(agree / n, 4),
        "decode_ms_full": round(1000 * seconds["full"] / n, 1),
        "decode_ms_fast": round(1000 * seconds["fast"] / n, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, default=MODELS_DIR / DEFAULT_MODEL)
    p.add_argument("--scale", type=int, default=4, help="each held-out image is enlarged this many times")
    p.add_argument("--views", nargs="+", default=["crops", "photos"], choices=["crops", "photos"])
    p.add_argument("--out", type=Path, default=BENCH_VAR / "decode_parity")
    args = p.parse_args(argv)
    export = ExportDir(args.export)
    cfg = training_config(export, None)
    predictor = Predictor.for_export(export)  # what the server runs: int8 when the export has it
    held_out = held_out_samples(cfg, export.path, "test")
    report = {"export": str(export.path), "engine": predictor.engine, "scale": args.scale, "quality": QUALITY}
    report["decode_side"] = predictor.decode_side
    for view in available_views(cfg, args.views):
        samples, crop_to_bbox = data.view_samples(held_out, view, cfg.data)
        report[view] = compare_view(predictor, samples, crop_to_bbox, args.scale)
        print(f"{view}: {json.dumps(report[view])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / f"decode_parity-{timestamp()}.json"
    saved.write_text(json.dumps(report, indent=1))
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
