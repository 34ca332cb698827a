"""The batch script against the server's own throughput: does `predict-dir` keep the server busy?

    python -m bench.batch_script                      # 1,000 photos, concurrency 32, the shipped model
    python -m bench.batch_script --images 2000 --concurrency 16 --model resnet50_cars

Starts this project's TorchServe with the model, measures its throughput with hey (one car JPEG,
`--concurrency`, `--duration`), then runs `predict-dir` (client/predict_dir.py) as a user would, over
`--images` real photos from ../shared (spread over all classes; linked, not copied, into
var/bench/batch_images/) at the same concurrency, and prints both and their ratio. The batch
script is Python, so unlike hey it shares the server's two cores: the ratio includes what the
client costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import loadgen
from bench.common import BENCH_VAR, ROOT, SHARED_TRAIN, BenchError, pick_image
from bench.exports import resolve_export
from bench.harness import add_ours_arguments, fresh_server, parse_duration, warm_up
from carmodel.images import IMAGE_SUFFIXES
from carmodel.paths import DEFAULT_MODEL

IMAGES_DIR = BENCH_VAR / "batch_images"
OUT_DIR = BENCH_VAR / "batch_out"
PREDICT_DIR = [sys.executable, "-m", "client.predict_dir"]  # the `predict-dir` command


def link_images(count: int, source: Path = SHARED_TRAIN, target: Path = IMAGES_DIR) -> list[Path]:
    """`count` photos taken evenly from the sorted dataset, symlinked as <class>/<file>."""
    if not source.is_dir():
        raise BenchError(f"no photos at {source} (the Stanford Cars folder next to the project)")
    photos = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(photos) < count:
        raise BenchError(f"asked for {count} photos, {source} has {len(photos)}")
    shutil.rmtree(target, ignore_errors=True)
    chosen = photos[:: len(photos) // count][:count]
    for photo in chosen:
        link = target / photo.parent.name / photo.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(photo)
    return chosen


def run_batch_script(url: str, model: str, concurrency: int) -> tuple[dict, float]:
    """`predict-dir` as a subprocess; its results JSON and the wall time including start-up."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    cmd = [*PREDICT_DIR, str(IMAGES_DIR), "--model", model, "--url", url]
    started = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--concurrency", str(concurrency), "--quiet", "--out", str(OUT_DIR)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"predict-dir failed ({done.returncode}): {done.stderr[-1000:]}")
    results = json.loads(next(OUT_DIR.glob("*.json")).read_text())
    return results, wall


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="models/<name>, or <arch>_cars (random)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=parse_duration, default=parse_duration("15s"), help="the hey run")
    add_ours_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loadgen.ensure_hey()
        photos = link_images(args.images)
        mean_kb = sum(p.stat().st_size for p in photos) / len(photos) / 1024
        with fresh_server("ours", resolve_export(args.model), args, label="batch") as served:
            name = served.name
            image = pick_image()
            warm_up(served, image)
            hey = loadgen.run_hey(served.predict_url, image, args.concurrency, args.duration, None)
            results, wall = run_batch_script(served.client.inference_url, name, args.concurrency)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    script_img_s = results["images_per_second"]
    photo_kb = image.stat().st_size / 1024
    print(f"server ({name}, hey -c {args.concurrency}, one {photo_kb:.0f} kB photo): {hey.img_s:.1f} img/s")
    print(
        f"predict-dir over {len(photos)} photos (mean {mean_kb:.0f} kB), --concurrency {args.concurrency}: "
        f"{script_img_s} img/s ({results['counts']['ok']} ok, {results['counts']['error']} failed), "
        f"{wall:.1f} s wall including start-up"
    )
    print(f"batch script / server: {script_img_s / hey.img_s:.0%}")
    return 0 if results["counts"]["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
