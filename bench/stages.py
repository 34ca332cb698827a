"""Where the time goes: one load level against this project's server, split by stage.

    python -m bench.stages --model resnet50_cars --concurrency 32
    python -m bench.stages --model efficientnet_lite0_cars --concurrency 1 32 --batch_size 8 --max_batch_delay 10

For each level it runs hey (as bench/run.py does) and reads, over exactly that window:

* the CPU time of each process (/proc): TorchServe's Java front end, the Python worker(s), hey,
  and everything else on the machine - in core-milliseconds per image, so the stages add up;
* TorchServe's own Prometheus counters: time a request waited in the model's queue, and its
  whole time inside TorchServe (queue + worker round trip);
* our handler's Prometheus counters (the same metrics endpoint): seconds spent and images
  handled per stage, preprocess (decode + eval preset) and inference (model forward), in the worker.

Every figure is a difference of running totals taken before and after the level.
Two cores give 2,000 core-ms per second; divided by the core-ms one image costs in all
processes, that is the most img/s this machine can serve with the stages as they are
(the "CPU bound" line). Results also go to var/bench/stages/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import loadgen, prometheus
from bench.common import BENCH_VAR, BenchError, pick_image, timestamp
from bench.exports import resolve_export
from bench.harness import add_ours_arguments, fresh_server, parse_duration, warm_up
from bench.servers import ServedModel
from carmodel.errors import exit_with
from handler.metrics import STAGE_BATCHES, STAGE_IMAGES, STAGE_SECONDS  # the handler's, per stage
from serving.client import TorchServeError

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUEUE_COUNTER = "ts_queue_latency_microseconds"
TOTAL_COUNTER = "ts_inference_latency_microseconds"
REQUESTS_COUNTER = "ts_inference_requests_total"
STAGES = ("preprocess", "inference")
METRICS = [QUEUE_COUNTER, TOTAL_COUNTER, REQUESTS_COUNTER, STAGE_SECONDS, STAGE_IMAGES, STAGE_BATCHES]
METRICS_SETTLE_S = 1.0  # the worker's metrics reach the front end through its log stream


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


def counters(served: ServedModel) -> dict[str, float]:
    """TorchServe's request counters (summed over versions) and the handler's per-stage totals."""
    try:
        samples = prometheus.scrape(served.client, METRICS)
    except TorchServeError as err:
        raise BenchError(f"reading the metrics endpoint: {err.message}") from err
    totals = {name: prometheus.total(samples, name, model_name=served.name) for name in METRICS[:3]}
    for stage in STAGES:
        for name in (STAGE_SECONDS, STAGE_IMAGES, STAGE_BATCHES):
            totals[f"{name}/{stage}"] = prometheus.total(samples, name, stage=stage, ModelName=served.name)
    return totals


@dataclass
class Snapshot:
    at: float
    frontend_s: float
    workers_s: float
    machine_s: float
    counters: dict[str, float]

    @classmethod
    def take(cls, served: ServedModel, frontend: int, workers: list[int]) -> Snapshot:
        return cls(
            time.monotonic(),
            process_cpu_s(frontend),
            sum(process_cpu_s(pid) for pid in workers),
            machine_cpu_s(),
            counters(served),
        )


@dataclass
class StageProfile:
    concurrency: int
    img_s: float
    p50_ms: float | None
    errors: int
    images: int  # through the model forward, by the handler's counter
    mean_batch: float  # requests per batch the worker preprocessed
    queue_ms: float  # per request, TorchServe's counter
    in_torchserve_ms: float  # queue + worker round trip, per request
    preprocess_ms_per_image: float  # worker wall time
    model_ms_per_image: float  # worker wall time
    worker_busy_pct: float  # share of the window the worker(s) spent in preprocess + model
    cpu_core_ms_per_image: dict[str, float]
    cpu_bound_img_s: float


def profile_level(served: ServedModel, workers: list[int], image: Path, concurrency: int, args) -> StageProfile:
    frontend = served.frontend_pid()
    before = Snapshot.take(served, frontend, workers)
    result = loadgen.run_hey(served.predict_url, image, concurrency, args.duration, None)
    time.sleep(METRICS_SETTLE_S)
    after = Snapshot.take(served, frontend, workers)

    def delta(counter: str) -> float:
        return after.counters[counter] - before.counters[counter]

    images = max(1, round(delta(f"{STAGE_IMAGES}/inference")))
    requests_done = max(1.0, delta(REQUESTS_COUNTER))

    def per_request_ms(counter: str) -> float:
        return round(delta(counter) / requests_done / 1000, 2)

    def per_image_ms(stage: str) -> float:
        return round(1000 * delta(f"{STAGE_SECONDS}/{stage}") / max(1.0, delta(f"{STAGE_IMAGES}/{stage}")), 2)

    window = after.at - before.at
    frontend_s = after.frontend_s - before.frontend_s
    workers_s = after.workers_s - before.workers_s
    client_s = result.client_cpu_s
    others_s = max(0.0, (after.machine_s - before.machine_s) - frontend_s - workers_s - client_s)
    cpu = {"front end (Java)": frontend_s, "worker(s) (Python)": workers_s, "hey": client_s, "others": others_s}
    per_image = {k: round(1000 * v / images, 2) for k, v in cpu.items()}
    server_ms = per_image["front end (Java)"] + per_image["worker(s) (Python)"]
    busy_ms = 1000 * sum(delta(f"{STAGE_SECONDS}/{stage}") for stage in STAGES)
    return StageProfile(
        concurrency=concurrency,
        img_s=round(result.img_s, 1),
        p50_ms=result.percentiles_ms.get(50),
        errors=result.errors,
        images=images,
        mean_batch=round(delta(f"{STAGE_IMAGES}/preprocess") / max(1.0, delta(f"{STAGE_BATCHES}/preprocess")), 2),
        queue_ms=per_request_ms(QUEUE_COUNTER),
        in_torchserve_ms=per_request_ms(TOTAL_COUNTER),
        preprocess_ms_per_image=per_image_ms("preprocess"),
        model_ms_per_image=per_image_ms("inference"),
        worker_busy_pct=round(100 * busy_ms / 1000 / window / max(1, len(workers)), 1),
        cpu_core_ms_per_image=per_image,
        cpu_bound_img_s=round(os.cpu_count() * 1000 / server_ms, 1) if server_ms else 0.0,
    )


def report(model: str, settings: dict, p: StageProfile) -> str:
    cpu = p.cpu_core_ms_per_image
    lines = [
        f"{model} c={p.concurrency}: {p.img_s} img/s, p50 {p.p50_ms or float('nan'):.1f} ms, {p.errors} errors; "
        f"{settings['workers']} worker(s) x batch {settings['batch_size']}, "
        f"delay {settings['max_batch_delay_ms']} ms, {settings['engine']}",
        "  per request (wall):",
        f"    waiting in TorchServe's queue       {p.queue_ms:8.2f} ms",
        f"    in TorchServe (queue + worker)      {p.in_torchserve_ms:8.2f} ms",
        f"  per image in the worker (wall), batches of {p.mean_batch} on average:",
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
            settings = {**served.settings(), "engine": served.engine(), "handler": served.description()}
            warm_up(served, image)
            for concurrency in args.concurrency:
                profile = profile_level(served, settings["worker_pids"], image, concurrency, args)
                profiles.append(profile)
                print(report(name, settings, profile) + "\n", flush=True)
    except BenchError as err:
        return exit_with(err)
    out = BENCH_VAR / "stages" / f"{timestamp()}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": name, "settings": settings, "levels": [asdict(p) for p in profiles]}, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
