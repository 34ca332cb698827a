"""Peers, side by side: the servers a user would pick instead of TorchServe (bench/peer_apps.py), each
serving the same export through the same chain, measured as bench.run measures ours (hey, the same
photos, concurrency levels), with each server's memory (the peak RSS of its processes).

    python -m bench.peers                                   # ours + every peer, three photos, c = 1 8 32
    python -m bench.peers --peers fastapi litserve --photos benchmark --concurrency 32 --duration 10s
    python -m bench.peers --tune                            # each peer's settings swept first, best kept

Each peer gets its framework's own batching and worker settings (PEER_SETTINGS). `--tune` measures each
candidate at c=32 on the benchmark photo and keeps the fastest: that is how the defaults were chosen.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from bench import loadgen, photos, report
from bench.common import BENCH_VAR, ROOT, BenchError, PeakMemory, Row, pick_image, timestamp
from bench.exports import resolve_export
from bench.harness import RUN_DIRS, fresh_server, parse_duration, warm_up
from bench.peer_apps import PEERS, ROUTE
from carmodel.errors import exit_with
from carmodel.paths import DEFAULT_MODEL
from serving.torchserve import free_port

MODEL = DEFAULT_MODEL
READY_TIMEOUT_S = 180
BODIES = BENCH_VAR / "bodies"
# Each framework's own knobs, as its documentation shows them; chosen with --tune on this 2-core machine.
PEER_SETTINGS = {
    "fastapi": {"workers": 2, "threads": 1, "batch_size": 1},  # no batching in the original project's shape
    "litserve": {"workers": 1, "threads": 0, "batch_size": 8, "batch_delay_ms": 5},
    "rayserve": {"workers": 1, "threads": 0, "batch_size": 8, "batch_delay_ms": 5},
    "bentoml": {"workers": 1, "threads": 0, "batch_size": 8},
}
TUNE_CANDIDATES = {
    "fastapi": [{"workers": 1, "threads": 0}, {"workers": 2, "threads": 1}],
    "litserve": [{"workers": 1, "batch_size": 8}, {"workers": 2, "threads": 1, "batch_size": 8}, {"batch_size": 1}],
    "rayserve": [{"workers": 1, "batch_size": 8}, {"workers": 2, "threads": 1, "batch_size": 8}, {"batch_size": 1}],
    "bentoml": [{"workers": 1, "batch_size": 8}, {"workers": 2, "threads": 1, "batch_size": 8}, {"batch_size": 1}],
}


# ------------------------------------------------------------------------------ request bodies


@dataclass(frozen=True)
class Body:
    path: Path
    content_type: str


def body_for(peer: str, photo: Path) -> Body:
    """The photo as each server's idiom wants it: the raw bytes; base64 in JSON (LitServe); a multipart
    file (BentoML)."""
    BODIES.mkdir(parents=True, exist_ok=True)
    data = photo.read_bytes()
    if peer == "litserve":
        path = BODIES / f"{photo.stem}.json"
        path.write_text('{"image": "' + base64.b64encode(data).decode() + '"}')
        return Body(path, "application/json")
    if peer == "bentoml":
        boundary = uuid.uuid4().hex
        path = BODIES / f"{photo.stem}.multipart"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="{photo.name}"\r\n'
        path.write_bytes(
            (head + "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        )
        return Body(path, f"multipart/form-data; boundary={boundary}")
    return Body(photo, loadgen.CONTENT_TYPE)


# ------------------------------------------------------------------------------ memory


# ------------------------------------------------------------------------------ a peer's server


@dataclass
class PeerServer:
    peer: str
    url: str
    process: subprocess.Popen
    settings: dict


@contextlib.contextmanager
def peer_server(peer: str, export: Path, settings: dict, photo: Path):
    """Start one peer on a free loopback port; yield it once it answers a photo; always stop it."""
    port = free_port()
    flags = [f"--{key}={value}" for key, value in settings.items()]
    log = RUN_DIRS / f"peer-{peer}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.peer_apps", peer, "--export", str(export), "--port", str(port), *flags]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = PeerServer(peer, f"http://127.0.0.1:{port}{ROUTE.format(model=MODEL)}", process, settings)
    try:
        wait_answering(server, body_for(peer, photo), log)
        yield server
    finally:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                child.terminate()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_answering(server: PeerServer, body: Body, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    data, headers = body.path.read_bytes(), {"Content-Type": body.content_type}
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(f"{server.peer} exited ({server.process.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            response = requests.post(server.url, data=data, headers=headers, timeout=30)
            if response.status_code == 200 and isinstance(response.json(), list) and response.json():
                return
        time.sleep(1)
    raise BenchError(f"{server.peer} did not answer within {READY_TIMEOUT_S} s: {log.read_text()[-2000:]}")


# ------------------------------------------------------------------------------ measuring


def level(url: str, body: Body, concurrency: int, args, pids: list[int]) -> tuple[loadgen.HeyResult, int]:
    with PeakMemory(pids) as memory:
        result = loadgen.run_hey(url, body.path, concurrency, args.duration, None, body.content_type)
    return result, memory.peak


def row_of(setup: str, concurrency: int, result: loadgen.HeyResult, peak: int, photo: Path, settings: dict) -> Row:
    return Row(
        model=MODEL,
        setup=setup,
        level=f"c={concurrency}",
        img_s=result.img_s,
        p50_ms=result.percentiles_ms.get(50),
        p95_ms=result.percentiles_ms.get(95),
        p99_ms=result.percentiles_ms.get(99),
        errors=result.errors,
        requests=result.requests,
        workers=settings.get("workers"),
        batch_size=settings.get("batch_size"),
        photo=photos.label(photo),
        detail={"peak_rss_mb": round(peak / 2**20), "settings": settings, "status_counts": result.status_counts},
    )


def measure_peer(peer: str, export: Path, settings: dict, images: list[Path], args) -> list[Row]:
    rows = []
    with peer_server(peer, export, settings, images[0]) as server:
        for image in images:
            body = body_for(peer, image)
            loadgen.run_hey(server.url, body.path, 4, None, 16, body.content_type)  # warm-up
            for concurrency in args.concurrency:
                result, peak = level(server.url, body, concurrency, args, [server.process.pid])
                rows.append(row_of(peer, concurrency, result, peak, image, settings))
                print(f"    {peer} {photos.label(image)} c={concurrency}: {rows[-1].img_s:.1f} img/s", flush=True)
    return rows


def measure_ours(export, images: list[Path], args) -> list[Row]:
    from bench.harness import add_ours_arguments

    parser = argparse.ArgumentParser()
    add_ours_arguments(parser)
    ours_args = parser.parse_args([])
    rows = []
    with fresh_server("ours", export, ours_args) as served:
        settings = served.settings()
        pids = [served.frontend_pid()]
        for image in images:
            warm_up(served, image)
            for concurrency in args.concurrency:
                result, peak = level(served.predict_url, Body(image, loadgen.CONTENT_TYPE), concurrency, args, pids)
                rows.append(row_of("ours", concurrency, result, peak, image, settings))
                print(f"    ours {photos.label(image)} c={concurrency}: {rows[-1].img_s:.1f} img/s", flush=True)
    return rows


def tune(peer: str, export: Path, image: Path, args) -> dict:
    """Each candidate setting at c=32 on the benchmark photo; the fastest wins."""
    best, best_img_s = PEER_SETTINGS[peer], -1.0
    quick = argparse.Namespace(**{**vars(args), "concurrency": [32]})
    for candidate in TUNE_CANDIDATES[peer]:
        settings = {**PEER_SETTINGS[peer], **candidate}
        img_s = measure_peer(peer, export, settings, [image], quick)[0].img_s
        print(f"  tune {peer} {settings}: {img_s:.1f} img/s", flush=True)
        if img_s > best_img_s:
            best, best_img_s = settings, img_s
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--no_ours", action="store_true", help="only the peers")
    p.add_argument("--photos", nargs="+", choices=list(photos.KINDS), default=["benchmark", "web", "phone"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("15s"), help="per level")
    p.add_argument("--tune", action="store_true", help="sweep each peer's settings first")
    p.add_argument("--out", type=Path, help="results folder (default: var/bench/results/peers-<timestamp>)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or BENCH_VAR / "results" / f"peers-{timestamp()}"
    try:
        loadgen.ensure_hey()
        export = resolve_export(MODEL)
        image = pick_image().resolve()
        images = [photos.real_world_photo(image, kind) for kind in args.photos]
        rows, failures = [] if args.no_ours else measure_ours(export, images, args), {}
        for peer in args.peers:
            try:
                settings = tune(peer, export.path, images[0], args) if args.tune else PEER_SETTINGS[peer]
                rows += measure_peer(peer, export.path, settings, images, args)
            except BenchError as err:
                print(f"  {peer} failed: {err}", file=sys.stderr)
                failures[peer] = str(err)
    except BenchError as err:
        return exit_with(err)
    table = report.peers_markdown(rows)
    meta = {"when": timestamp(), "photos": [photos.label(p) for p in images], "failures": failures}
    results, table_md = report.save(out, meta, rows, table, 0)
    print(f"\n{table}\n\nsaved {results} and {table_md}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
