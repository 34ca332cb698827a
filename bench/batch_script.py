"""predict-dir's two engines over the same real photos: img/s, peak memory, and how fast Ctrl-C stops it.

    python -m bench.batch_script                      # 2,000 photos, concurrency 8, the shipped model
    python -m bench.batch_script --images 1000 --engines server

`--images` real photos from ../shared (spread over all classes; linked, not copied, into
var/bench/batch_images/) go through `predict-dir` (client/predict_dir.py) as a user runs it:

* server: this project's TorchServe with the model (its throughput with hey, one car JPEG, printed
  for comparison), and predict-dir's requests at `--concurrency`;
* ray: `--engine ray --export`, the export's Predictor in `--concurrency` Ray Data actors on this
  machine (2 cores here: `--ray_actors` overrides).

Peak memory is the RSS of every process involved, sampled every 0.2 s: predict-dir and its
children (Ray's own processes and actors), plus TorchServe's front end and worker for the server
engine. Then each engine runs again and gets a SIGINT (Ctrl-C) half way: the time to a clean exit,
and whether every answered photo's line is on disk. The client shares the machine's cores with
whatever serves it: these are figures of the whole job, not of the server alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import loadgen
from bench.common import BENCH_VAR, ROOT, SHARED_TRAIN, BenchError, PeakMemory, pick_image
from bench.exports import resolve_export
from bench.harness import add_ours_arguments, fresh_server, parse_duration, warm_up
from carmodel.errors import exit_with
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


def predict_dir(engine: str, args, url: str | None, model: str, export: Path) -> list[str]:
    command = [*PREDICT_DIR, str(IMAGES_DIR), "--quiet", "--out", str(OUT_DIR)]
    if engine == "server":
        return [*command, "--model", model, "--url", url, "--concurrency", str(args.concurrency)]
    return [*command, "--engine", "ray", "--export", str(export), "--concurrency", str(args.ray_actors)]


def run_batch_script(command: list[str], watch: list[int]) -> tuple[dict, float, int]:
    """predict-dir as a subprocess: its summary, the wall time including start-up, the peak RSS (MB) of
    it, its children and the `watch` processes."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory([process.pid, *watch]) as memory:
        _, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise BenchError(f"predict-dir failed ({process.returncode}): {stderr[-1000:]}")
    return json.loads(next(OUT_DIR.glob("*.summary.json")).read_text()), wall, memory.peak // 2**20


def interrupt_half_way(command: list[str], images: int) -> dict:
    """Ctrl-C once half the photos have their line: seconds to exit, exit code, lines on disk vs the summary's."""
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        lines = next(OUT_DIR.glob("*.jsonl"), None)
        if lines and lines.read_bytes().count(b"\n") >= images // 2:
            break
        time.sleep(0.05)
    sent = time.perf_counter()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    exit_s = time.perf_counter() - sent
    lines = next(OUT_DIR.glob("*.jsonl"))
    summary = json.loads(next(OUT_DIR.glob("*.summary.json")).read_text())
    on_disk = len(lines.read_text().splitlines())
    return {"exit_s": exit_s, "code": process.returncode, "lines": on_disk, "answered": summary["answered"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="models/<name>, or <arch>_cars (random)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--engines", nargs="+", choices=("server", "ray"), default=["server", "ray"])
    p.add_argument("--concurrency", type=int, default=8, help="predict-dir's requests in flight (server engine)")
    p.add_argument("--ray_actors", type=int, default=os.cpu_count(), help="Ray actors of one core each")
    p.add_argument("--duration", type=parse_duration, default=parse_duration("15s"), help="the hey run")
    add_ours_arguments(p)
    return p.parse_args(argv)


def report(engine: str, photos: int, mean_kb: float, summary: dict, wall: float, peak_mb: int, stop: dict) -> None:
    counts = summary["counts"]
    print(
        f"{engine}: {photos} photos (mean {mean_kb:.0f} kB): {summary['images_per_second']} img/s "
        f"({counts['ok']} ok, {counts['error']} failed), {wall:.1f} s wall including start-up, peak RSS {peak_mb} MB"
    )
    kept = "all on disk" if stop["lines"] == stop["answered"] else f"{stop['lines']} lines for {stop['answered']}"
    print(
        f"{engine}: Ctrl-C half way: exit {stop['code']} after {stop['exit_s']:.2f} s, "
        f"{stop['answered']} answered, {kept}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    failed = 0
    try:
        photos = link_images(args.images)
        mean_kb = sum(p.stat().st_size for p in photos) / len(photos) / 1024
        export = resolve_export(args.model)
        if "server" in args.engines:
            loadgen.ensure_hey()
            with fresh_server("ours", export, args, label="batch") as served:
                image = pick_image()
                warm_up(served, image)
                hey = loadgen.run_hey(served.predict_url, image, args.concurrency, args.duration, None)
                print(f"server ({served.name}, hey -c {args.concurrency}, one car JPEG): {hey.img_s:.1f} img/s")
                command = predict_dir("server", args, served.client.inference_url, served.name, export.path)
                summary, wall, peak = run_batch_script(command, [served.frontend_pid()])
                report("server", len(photos), mean_kb, summary, wall, peak, interrupt_half_way(command, len(photos)))
                failed += summary["counts"]["error"]
        if "ray" in args.engines:
            command = predict_dir("ray", args, None, export.model_name, export.path)
            summary, wall, peak = run_batch_script(command, [])
            report("ray", len(photos), mean_kb, summary, wall, peak, interrupt_half_way(command, len(photos)))
            failed += summary["counts"]["error"]
    except BenchError as err:
        return exit_with(err)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
