"""What the benchmark scripts share: our server's settings as flags, a fresh server per setup,
the warm-up, durations. run.py, stages.py and batch_script.py import from here, not from each other.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from bench import archives, loadgen
from bench.common import BENCH_VAR, BenchError
from bench.servers import ServedModel, serving
from carmodel import typed
from carmodel.export import ExportDir
from handler.settings import HandlerSettings, WorkerSettings

STORES = BENCH_VAR / "store"  # archives, rebuilt on every run
RUN_DIRS = BENCH_VAR / "ts"  # TorchServe state and logs (short paths: worker sockets live there)
WARMUP_REQUESTS = 16
WARMUP_CONCURRENCY = 4
DURATION_UNITS = {"s": 1, "m": 60}


def parse_duration(text: str) -> float:
    """`15s`, `1m` or plain seconds."""
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"duration like 15s or 1m, got {text!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return seconds


# ------------------------------------------------------------------------------ our server's settings


def add_ours_arguments(parser: argparse.ArgumentParser) -> None:
    """Our server's settings: build-mar's own flags (handler.settings), with its defaults. The handler's
    backend/precision/threads/limits also set the in-process ceiling (bench/run.py)."""
    typed.add_arguments(parser, WorkerSettings)
    typed.add_arguments(parser, HandlerSettings)


def ours_settings(args) -> tuple[WorkerSettings, HandlerSettings]:
    return tuple(typed.from_dict(cls, typed.flags_given(args, cls)) for cls in (WorkerSettings, HandlerSettings))


def settings_overrides(args) -> dict:
    """The settings given on the command line (for the results' metadata)."""
    return {**typed.flags_given(args, WorkerSettings), **typed.flags_given(args, HandlerSettings)}


# ------------------------------------------------------------------------------ servers


def build_archive(setup: str, export: ExportDir, args) -> tuple[Path, str, str]:
    """(model store, model name, archive file) for the setup; `args` has add_ours_arguments' flags."""
    store = STORES / setup
    if setup == "stock":
        return store, *archives.build_stock(export, store)
    return store, *archives.build_ours(export, store, *ours_settings(args))


@contextlib.contextmanager
def fresh_server(setup: str, export: ExportDir, args, label: str | None = None):
    """Build the setup's archive, start it in an emptied state folder, yield the ServedModel, stop it."""
    store, name, archive = build_archive(setup, export, args)
    run_dir = RUN_DIRS / f"{label or setup}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    with serving(setup, run_dir, store, name, archive) as served:
        yield served


def warm_up(served: ServedModel, image: Path) -> None:
    result = loadgen.run_hey(served.predict_url, image, WARMUP_CONCURRENCY, None, WARMUP_REQUESTS)
    if result.ok == 0:
        failed = {**result.status_counts, **result.error_counts}
        logs = served.server.run_dir / "logs"
        raise BenchError(f"no successful prediction while warming up {served.predict_url}: {failed} (see {logs})")
