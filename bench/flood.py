"""A flood of huge-but-legal images against one normal photo: does the normal photo still get through?

    python -m bench.flood                                  # our defaults, then the budget off, 30 s each
    python -m bench.flood --duration 20s --flood_concurrency 32

A 49-megapixel PNG (8,100 x 6,000, under the 50-megapixel limit) that compresses to a few hundred kB
costs ~0.2 s of decoding: cheap to send, dear to answer. hey sends it at `--flood_concurrency` for
`--duration` while a second hey sends the benchmark photo one at a time. Printed per run: the normal
photo's p50/p99 and how many got through, the flood's statuses (503: its turn will come, Retry-After),
and the server's peak RSS (front end + worker). The same run with `--batch_decode_pixels` set
beyond any batch (the budget off) shows what the budget buys.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from bench import loadgen
from bench.common import BENCH_VAR, BenchError, PeakMemory, pick_image
from bench.exports import resolve_export
from bench.harness import add_ours_arguments, fresh_server, parse_duration, warm_up
from carmodel.errors import exit_with
from carmodel.paths import DEFAULT_MODEL

FLOOD_SIZE = (8100, 6000)  # 48.6 megapixels: legal (the limit is 50)
NO_BUDGET = 10**12


def flood_png(path: Path = BENCH_VAR / "flood_49mp.png") -> Path:
    """Smooth bands and a little noise: a full 49-megapixel decode from a small file."""
    if not path.is_file():
        width, height = FLOOD_SIZE
        rng = np.random.default_rng(0)
        row = (np.linspace(0, 255, width) + rng.integers(0, 3, width)).astype(np.uint8)
        pixels = np.repeat(np.stack([row, row[::-1], np.full(width, 128, np.uint8)], -1)[None], height, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, optimize=True)
    return path


def one_run(export, args, budget: int | None) -> dict:
    args.setting_batch_decode_pixels = budget  # None: the archive's default
    flood, photo = flood_png(), pick_image()
    with fresh_server("ours", export, args, label="flood") as served:
        warm_up(served, photo)
        results = {}

        def flood_it():
            results["flood"] = loadgen.run_hey(
                served.predict_url, flood, args.flood_concurrency, args.duration, None, "image/png"
            )

        with PeakMemory([served.frontend_pid()]) as memory:
            thread = threading.Thread(target=flood_it)
            thread.start()
            results["normal"] = loadgen.run_hey(served.predict_url, photo, 1, args.duration, None)
            thread.join()
    return {**results, "peak_mb": memory.peak // 2**20}


def describe(label: str, run: dict) -> str:
    normal, flood = run["normal"], run["flood"]
    return (
        f"{label}: normal photo p50 {normal.percentiles_ms.get(50, float('nan')):.0f} ms, "
        f"p99 {normal.percentiles_ms.get(99, float('nan')):.0f} ms, {normal.ok} answered "
        f"({normal.status_counts}); flood {dict(sorted(flood.status_counts.items()))}, "
        f"errors {flood.error_counts or 'none'}; server peak RSS {run['peak_mb']} MB"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--duration", type=parse_duration, default=parse_duration("30s"))
    p.add_argument("--flood_concurrency", type=int, default=32)
    p.add_argument("--budget_off", action=argparse.BooleanOptionalAction, default=True, help="also run without it")
    add_ours_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loadgen.ensure_hey()
        export = resolve_export(args.model)
        size = flood_png().stat().st_size // 1024
        print(f"flood image: {FLOOD_SIZE[0]}x{FLOOD_SIZE[1]} PNG, {size} kB; c={args.flood_concurrency}")
        print(describe("budget on", one_run(export, args, budget=args.setting_batch_decode_pixels)))
        if args.budget_off:
            print(describe("budget off", one_run(export, args, budget=NO_BUDGET)))
    except BenchError as err:
        return exit_with(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
