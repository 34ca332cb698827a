"""Serving benchmark: img/s, p50/p95/p99 latency and errors at several concurrency levels, for

  stock      TorchServe's own `image_classifier` handler, TorchServe's default settings
  ours       this project's handler and config (serving.archive + serving.torchserve.Server)
  inprocess  the ceiling: decode + preprocess + forward in one Python process, no HTTP

on the same weights, driven by `hey` (a separate, compiled load generator) with a real car JPEG.
One TorchServe at a time; run it on an otherwise idle machine.

    python -m bench.run
    python -m bench.run --models resnet50_cars efficientnet_lite0_cars --concurrency 1 8 32 --duration 15s
    python -m bench.run --only ours --batch_size 8 --max_batch_delay 10 --workers 2
    python -m bench.run --models efficientnet_lite0_cars --only ours inprocess --photos benchmark web phone phone_png

`--photos`: the request photo as it is (benchmark) and re-made at the sizes people send (bench/photos.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import inprocess, loadgen, photos, report
from bench.common import BENCH_VAR, ROOT, BenchError, Row, describe_image, pick_image, timestamp
from bench.cpu import CpuMeter, wait_until_quiet
from bench.exports import resolve_export
from bench.harness import (
    RUN_DIRS,
    add_ours_arguments,
    fresh_server,
    ours_settings,
    parse_duration,
    settings_overrides,
    warm_up,
)
from carmodel.errors import exit_with
from carmodel.export import ExportDir
from carmodel.paths import DEFAULT_MODEL

DEFAULT_MODELS = ["resnet50_cars", DEFAULT_MODEL]
DEFAULT_CONCURRENCY = [1, 8, 32]
DEFAULT_DURATION = "15s"
DEFAULT_INPROCESS_BATCHES = [1, 2, 4, 8, 16]
DEFAULT_INPROCESS_SECONDS = 5.0
SETUPS = ["stock", "ours", "inprocess"]
STOCK_INPUT_SIZE = 224  # image_classifier: Resize(256) + CenterCrop(224)
QUIET_WINDOW_S = 3.0  # how long other processes must stay under --quiet_pct before a measurement
DEFAULT_QUIET_PCT = 25.0  # of one core
DEFAULT_QUIET_TIMEOUT_S = 600.0
SERVING_PATHS = ["carmodel", "serving", "models"]  # the served code, its TorchServe config (serving/) and exports


# ------------------------------------------------------------------------------ HTTP setups


def wait_for_quiet(args) -> None:
    """Measure on a quiet machine: wait (bounded) until other processes leave the cores alone."""
    started = time.monotonic()
    others = wait_until_quiet(str(RUN_DIRS), args.quiet_pct, QUIET_WINDOW_S, args.quiet_timeout)
    waited = time.monotonic() - started
    if others >= args.quiet_pct:
        print(f"    warning: other processes still use {others:.0f}% of a core; measuring anyway", flush=True)
    elif waited > 2 * QUIET_WINDOW_S:
        print(f"    waited {waited:.0f} s for other processes to go quiet", flush=True)


def measure_level(url: str, image: Path, concurrency: int, args) -> tuple[loadgen.HeyResult, float]:
    """One hey run on a quiet machine; returns it and the CPU others took meanwhile (% of a core)."""
    wait_for_quiet(args)
    meter = CpuMeter(str(RUN_DIRS)).start()
    result = loadgen.run_hey(url, image, concurrency, args.duration, args.requests)
    return result, meter.others_pct()


def level_row(model: str, setup: str, concurrency: int, result: loadgen.HeyResult, server: dict, others: float) -> Row:
    return Row(
        model=model,
        setup=setup,
        level=f"c={concurrency}",
        img_s=result.img_s,
        p50_ms=result.percentiles_ms.get(50),
        p95_ms=result.percentiles_ms.get(95),
        p99_ms=result.percentiles_ms.get(99),
        errors=result.errors,
        requests=result.requests,
        workers=server["workers"],
        batch_size=server["batch_size"],
        input_size=server["input_size"],
        engine=server["engine"],
        client_cpu_pct=100 * result.client_cpu_s / result.wall_s if result.wall_s else None,
        other_cpu_pct=others,
        detail={"status_counts": result.status_counts, "error_counts": result.error_counts, "server": server},
    )


def http_rows(setup: str, model: str, export: ExportDir, images: list[Path], args) -> list[Row]:
    """One server for every photo: each photo warms it up, then runs each concurrency level."""
    size = STOCK_INPUT_SIZE if setup == "stock" else export.model_config.eval_size
    rows = []
    with fresh_server(setup, export, args) as served:
        server = {**served.settings(), "engine": served.engine(), "input_size": size, "handler": served.description()}
        print(f"  {setup}: {server['workers']} worker(s) x {server['batch_size']}, {server['engine']}", flush=True)
        for image in images:
            warm_up(served, image)
            for concurrency in args.concurrency:
                result, others = measure_level(served.predict_url, image, concurrency, args)
                row = level_row(model, setup, concurrency, result, server, others)
                row.photo = photos.label(image)
                rows.append(row)
                print(
                    f"    {row.photo}, c={concurrency}: {row.img_s:.1f} img/s, {row.errors} errors, "
                    f"others {others:.0f}%",
                    flush=True,
                )
    return rows


def inprocess_rows(model: str, export: ExportDir, images: list[Path], args) -> list[Row]:
    _, handler = ours_settings(args)  # the handler's engine and limits: the same work as ours
    rows = []
    for image in images:
        wait_for_quiet(args)
        meter = CpuMeter(str(RUN_DIRS)).start()
        measured = inprocess.measure(model, export, image, args.inprocess_batches, args.inprocess_seconds, handler)
        for row in measured:  # one figure for the whole sweep
            row.other_cpu_pct = meter.others_pct()
            row.photo = photos.label(image)
        rows += measured
    return rows


# ------------------------------------------------------------------------------ orchestration


def bench_model(model: str, images: list[Path], args, failures: dict) -> list[Row]:
    export = resolve_export(model)
    print(f"{model}: export {export.path}", flush=True)
    rows = []
    for setup in args.only:
        try:
            if setup == "inprocess":
                print("  inprocess: batch sizes " + " ".join(map(str, args.inprocess_batches)), flush=True)
                rows += inprocess_rows(model, export, images, args)
            else:
                rows += http_rows(setup, model, export, images, args)
        except BenchError as err:
            print(f"  {setup} failed: {err}", file=sys.stderr)
            failures[f"{model}/{setup}"] = str(err)
    return rows


def git_state() -> str:
    """The commit, and the serving files that differ from it: the handler benchmarked is the working tree's."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run([*git, "status", "--porcelain", *SERVING_PATHS], capture_output=True, text=True).stdout
    changed = [line[3:] for line in status.splitlines()]
    return f"{head or '?'}" + (f" + uncommitted: {', '.join(changed)}" if changed else "")


def metadata(args, image: Path, images: list[Path]) -> dict:
    import torch
    import ts

    return {
        "when": timestamp(),
        "git": git_state(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "image": describe_image(image),
        "photos": [photos.label(path) for path in images],
        "per_level": f"{args.requests} requests" if args.requests else f"{args.duration:g} s",
        "load_generator": f"hey {loadgen.hey_version() or '?'} (-cpus {loadgen.HEY_CPUS})",
        "torch": torch.__version__,
        "torch_threads_inprocess": torch.get_num_threads(),
        "torchserve": getattr(ts, "__version__", "?"),
        "ours_overrides": settings_overrides(args),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models/<name>, or <arch>_cars (random)")
    p.add_argument("--concurrency", nargs="+", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--duration", type=parse_duration, default=parse_duration(DEFAULT_DURATION), help="per level")
    p.add_argument("--requests", type=int, help="per level, instead of --duration")
    p.add_argument("--only", nargs="+", choices=SETUPS, default=SETUPS, help="which setups to run")
    p.add_argument("--image", type=Path, help="request body (default: a ~500x300 car from ../shared)")
    p.add_argument(
        "--photos",
        nargs="+",
        choices=list(photos.KINDS),
        default=["benchmark"],
        help="the request body as it is, and re-made at real-world sizes (bench/photos.py)",
    )
    p.add_argument("--out", type=Path, help="results folder (default: var/bench/results/<timestamp>)")
    add_ours_arguments(p)
    quiet = p.add_argument_group("a quiet machine")
    quiet.add_argument("--quiet_pct", type=float, default=DEFAULT_QUIET_PCT, help="others' CPU, %% of one core")
    quiet.add_argument("--quiet_timeout", type=float, default=DEFAULT_QUIET_TIMEOUT_S, help="s to wait, per level")
    ceiling = p.add_argument_group("inprocess")
    ceiling.add_argument("--inprocess_batches", nargs="+", type=int, default=DEFAULT_INPROCESS_BATCHES)
    ceiling.add_argument("--inprocess_seconds", type=float, default=DEFAULT_INPROCESS_SECONDS, help="per batch size")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or BENCH_VAR / "results" / timestamp()
    try:
        if set(args.only) & {"stock", "ours"}:
            loadgen.ensure_hey()
        image = (args.image or pick_image()).resolve()
        images = [photos.real_world_photo(image, kind) for kind in args.photos]
        meta = metadata(args, image, images)
        print(f"image {image}; photos {', '.join(meta['photos'])}; {meta['per_level']} per level")
        failures, rows = {}, []
        for model in args.models:
            rows += bench_model(model, images, args, failures)
    except BenchError as err:
        return exit_with(err)
    meta["failures"] = failures
    table = report.markdown(rows, args.quiet_pct)
    results, table_md = report.save(out, meta, rows, table, args.quiet_pct)
    print(f"\n{table}\n\n{report.notes(args.quiet_pct)}\n\nsaved {results} and {table_md}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
