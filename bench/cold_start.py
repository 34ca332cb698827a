"""Cold start: from `serve start` (fresh run dir, archive already built) to the first successful
prediction, as a user would run it. Also prints the archive's size.

    python -m bench.cold_start                                   # the shipped default model
    python -m bench.cold_start --export var/bench/exports/resnet50_cars --repeat 3

Two times per start: when `serve start` returned (it waits until the model is READY) and the
first 200 (a client polling /predictions every POLL_INTERVAL_S from the moment it is launched).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.archives import build_ours
from bench.common import BENCH_VAR, MODELS_DIR, ROOT, BenchError, pick_image, timestamp
from carmodel.errors import exit_with
from carmodel.export import ExportDir
from carmodel.paths import DEFAULT_MODEL
from handler.settings import HandlerSettings, WorkerSettings
from serving.client import TorchServeClient, TorchServeError
from serving.torchserve import ADDRESS_KEYS, Server, free_ports

POLL_INTERVAL_S = 0.1
REQUEST_TIMEOUT_S = 30
START_TIMEOUT_S = 300
COLD_VAR = BENCH_VAR / "cold"
SERVE = [sys.executable, "-m", "serving.serve"]  # the `serve` command


def port_flags(ports: dict[str, int]) -> list[str]:
    return [x for api in ADDRESS_KEYS for x in (f"--{api}_port", str(ports[api]))]


def first_prediction(
    client: TorchServeClient, name: str, body: bytes, launched: float, serve: subprocess.Popen
) -> float:
    """Poll until a 200; returns the seconds from launch to it."""
    deadline = launched + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if client.predict(name, body, timeout=REQUEST_TIMEOUT_S).status_code == 200:
                return time.monotonic() - launched
        except TorchServeError:  # not listening yet
            pass
        if serve.poll() not in (None, 0):
            raise BenchError(f"serve start failed:\n{serve.stdout.read()[-2000:]}")
        time.sleep(POLL_INTERVAL_S)
    raise BenchError(f"no successful prediction within {START_TIMEOUT_S}s")


def watch_exit(proc: subprocess.Popen, launched: float) -> dict:
    """A dict that gets "s", the seconds from launch to the process's exit, when it exits."""
    exited = {}

    def wait():
        proc.wait()
        exited["s"] = time.monotonic() - launched

    threading.Thread(target=wait, daemon=True).start()
    return exited


def cold_start(store: Path, name: str, archive: str, body: bytes, run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    ports = free_ports()
    cmd = [*SERVE, "start", "--fresh", "--run_dir", str(run_dir), "--model_store", str(store)]
    cmd += ["--model", f"{name}={archive}", "--timeout", str(START_TIMEOUT_S), *port_flags(ports)]
    # The client of the instance `serve start` renders: the default profile on these ports.
    client = Server(run_dir=run_dir, model_store=store, ports=ports).client()
    launched = time.monotonic()
    serve = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    exited = watch_exit(serve, launched)
    try:
        first_ok = first_prediction(client, name, body, launched, serve)
        serve.wait(timeout=START_TIMEOUT_S)
        time.sleep(POLL_INTERVAL_S)  # let the watcher record the exit time
        return {"first_200_s": round(first_ok, 2), "serve_returned_s": round(exited.get("s", float("nan")), 2)}
    finally:
        if serve.poll() is None:
            serve.wait(timeout=START_TIMEOUT_S)
        subprocess.run([*SERVE, "stop", "--run_dir", str(run_dir)], cwd=ROOT, capture_output=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, default=MODELS_DIR / DEFAULT_MODEL)
    p.add_argument("--repeat", type=int, default=1, help="cold starts, each in a fresh run dir")
    p.add_argument("--image", type=Path, help="default: a ~500x300 car from ../shared")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    store = COLD_VAR / "store"
    try:
        name, archive = build_ours(ExportDir(args.export.resolve()), store, WorkerSettings(), HandlerSettings())
        size_mb = (store / archive).stat().st_size / 1e6
        print(f"{archive}: {size_mb:.1f} MB")
        body = (args.image or pick_image()).read_bytes()
        runs = [cold_start(store, name, archive, body, COLD_VAR / f"run{i}") for i in range(args.repeat)]
    except BenchError as err:
        return exit_with(err)
    for i, run in enumerate(runs):
        first, returned = run["first_200_s"], run["serve_returned_s"]
        print(f"start {i + 1}: first 200 after {first:.1f} s (serve start returned after {returned:.1f} s)")
    median = statistics.median(r["first_200_s"] for r in runs)
    print(f"median time to first prediction: {median:.1f} s over {len(runs)} start(s)")
    out = COLD_VAR / f"cold_start-{timestamp()}.json"
    out.write_text(json.dumps({"archive": archive, "archive_mb": round(size_mb, 1), "runs": runs}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
