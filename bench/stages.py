"""Where the time goes: one load level against this project's server, split by stage.

    python bench/stages.py --model resnet50_cars --concurrency 32
    python bench/stages.py --model efficientnet_lite0_cars --concurrency 1 32 --batch_size 8 --max_batch_delay 10

For each level it runs hey (as bench/run.py does) and reads, over exactly that window:

* the CPU time of each process (/proc): TorchServe's Java front end, the Python worker(s), hey,
  and everything else on the machine - in core-milliseconds per image, so the stages add up;
* TorchServe's own Prometheus counters: time a request waited in the model's queue, and its
  whole time inside TorchServe (queue + worker round trip);
* the handler's per-batch log line: batch size, preprocess (decode + eval preset) and model
  forward time in the worker.

Two cores give 2,000 core-ms per second; divided by the core-ms one image costs in all
processes, that is the most img/s this machine can serve with the stages as they are
(the "CPU bound" line). Results also go to var/bench/stages/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen  # noqa: E402
from bench.common import BENCH_VAR, BenchError, pick_image, timestamp  # noqa: E402
from bench.exports import resolve_export  # noqa: E402
from bench.run import add_ours_arguments, fresh_server, parse_duration, warm_up  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BATCH_LINE = re.compile(r"batch of (\d+) request\(s\), (\d+) refused: preprocess ([\d.]+) ms, inference ([\d.]+) ms")
QUEUE_COUNTER = "ts_queue_latency_microseconds"
TOTAL_COUNTER = "ts_inference_latency_microseconds"
REQUESTS_COUNTER = "ts_inference_requests_total"
HTTP_TIMEOUT_S = 10


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process, all its threads (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine, all cores (/proc/stat minus idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS


def prometheus_totals(metrics_url: str) -> dict[str, float]:
    """TorchServe's request counters, summed over versions."""
    text = requests.get(f"{metrics_url}/metrics", timeout=HTTP_TIMEOUT_S).text
    totals = dict.fromkeys((QUEUE_COUNTER, TOTAL_COUNTER, REQUESTS_COUNTER), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


@dataclass
class Snapshot:
    at: float
    frontend_s: float
    workers_s: float
    machine_s: float
    counters: dict[str, float]
    log_offset: int

    @classmethod
    def take(cls, frontend: int, workers: list[int], metrics_url: str, log: Path) -> Snapshot:
        return cls(
            time.monotonic(),
            process_cpu_s(frontend),
            sum(process_cpu_s(pid) for pid in workers),
            machine_cpu_s(),
            prometheus_totals(metrics_url),
            log.stat().st_size if log.is_file() else 0,
        )


@dataclass
class StageProfile:
    concurrency: int
    img_s: float
    p50_ms: float | None
    errors: int
    images: int
    mean_batch: float
    queue_ms: float  # per request, TorchServe's counter
    in_torchserve_ms: float  # queue + worker round trip, per request
    preprocess_ms_per_image: float  # worker wall time
    model_ms_per_image: float  # worker wall time
    worker_busy_pct: float  # share of the window the worker(s) spent in preprocess + model
    cpu_core_ms_per_image: dict[str, float]
    cpu_bound_img_s: float


def batches_since(log: Path, offset: int) -> list[tuple[int, int, float, float]]:
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(int(n), int(bad), float(pre), float(inf)) for n, bad, pre, inf in BATCH_LINE.findall(text)]


def profile_level(served, frontend: int, workers: list[int], image: Path, concurrency: int, args) -> StageProfile:
    log = served.server.run_dir / "logs" / "model_log.log"
    metrics_url = served.server.url("metrics")
    before = Snapshot.take(frontend, workers, metrics_url, log)
    result = loadgen.run_hey(served.predict_url, image, concurrency, args.duration, None)
    time.sleep(1)  # the worker's log lines reach model_log.log through the front end
    after = Snapshot.take(frontend, workers, metrics_url, log)

    batches = batches_since(log, before.log_offset)
    images = max(1, sum(n - bad for n, bad, _, _ in batches))
    requests_done = max(1.0, after.counters[REQUESTS_COUNTER] - before.counters[REQUESTS_COUNTER])

    def per_request_ms(counter: str) -> float:
        return round((after.counters[counter] - before.counters[counter]) / requests_done / 1000, 2)

    window = after.at - before.at
    frontend_s = after.frontend_s - before.frontend_s
    workers_s = after.workers_s - before.workers_s
    client_s = result.client_cpu_s
    others_s = max(0.0, (after.machine_s - before.machine_s) - frontend_s - workers_s - client_s)
    cpu = {"front end (Java)": frontend_s, "worker(s) (Python)": workers_s, "hey": client_s, "others": others_s}
    per_image = {k: round(1000 * v / images, 2) for k, v in cpu.items()}
    server_ms = per_image["front end (Java)"] + per_image["worker(s) (Python)"]
    busy_ms = sum(pre + inf for _, _, pre, inf in batches)
    return StageProfile(
        concurrency=concurrency,
        img_s=round(result.img_s, 1),
        p50_ms=result.percentiles_ms.get(50),
        errors=result.errors,
        images=images,
        mean_batch=round(images / max(1, len(batches)), 2),
        queue_ms=per_request_ms(QUEUE_COUNTER),
        in_torchserve_ms=per_request_ms(TOTAL_COUNTER),
        preprocess_ms_per_image=round(sum(pre for _, _, pre, _ in batches) / images, 2),
        model_ms_per_image=round(sum(inf for _, _, _, inf in batches) / images, 2),
        worker_busy_pct=round(100 * busy_ms / 1000 / window / max(1, len(workers)), 1),
        cpu_core_ms_per_image=per_image,
        cpu_bound_img_s=round(os.cpu_count() * 1000 / server_ms, 1) if server_ms else 0.0,
    )


def report(model: str, settings: dict, p: StageProfile) -> str:
    cpu = p.cpu_core_ms_per_image
    lines = [
        f"{model} c={p.concurrency}: {p.img_s} img/s, p50 {p.p50_ms or float('nan'):.1f} ms, {p.errors} errors; "
        f"{settings['workers']} worker(s) x batch {settings['batch_size']} (mean batch {p.mean_batch}), "
        f"delay {settings['max_batch_delay_ms']} ms, {settings['engine']}",
        "  per request (wall):",
        f"    waiting in TorchServe's queue       {p.queue_ms:8.2f} ms",
        f"    in TorchServe (queue + worker)      {p.in_torchserve_ms:8.2f} ms",
        "  per image in the worker (wall):",
        f"    decode + preprocess                 {p.preprocess_ms_per_image:8.2f} ms",
        f"    model forward                       {p.model_ms_per_image:8.2f} ms",
        f"    worker busy with these two          {p.worker_busy_pct:8.1f} % of the time",
        "  CPU per image (core-ms, all threads):",
        *[f"    {name:<36}{value:8.2f}" for name, value in cpu.items()],
        f"  CPU bound: {os.cpu_count()} cores / (front end + worker core-ms per image) = {p.cpu_bound_img_s} img/s",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_cars", help="models/<name>, or <arch>_cars (random weights)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("15s"), help="per level")
    p.add_argument("--image", type=Path, help="request body (default: the benchmark's car)")
    add_ours_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        loadgen.ensure_hey()
        image = (args.image or pick_image()).resolve()
        profiles = []
        with fresh_server("ours", resolve_export(args.model), args, label="profile") as served:
            name = served.name
            frontend = int((served.server.run_dir / "tmp" / ".model_server.pid").read_text())
            settings = {**served.settings(), "engine": served.engine()}
            warm_up(served.predict_url, image)
            for concurrency in args.concurrency:
                profiles.append(profile_level(served, frontend, settings["worker_pids"], image, concurrency, args))
                print(report(name, settings, profiles[-1]) + "\n", flush=True)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = BENCH_VAR / "stages" / f"{timestamp()}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "settings": settings, "levels": [asdict(p) for p in profiles]}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
