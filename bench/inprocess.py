"""The ceiling: what the handler's work costs in this process, with no HTTP and no TorchServe.

Per image, exactly the handler's steps: decode the request body (handler.image_input: PIL,
EXIF, RGB), the eval preset (training.presets), then stack, forward, softmax and top-k for the
batch. The model is loaded by handler.model, as the worker loads it, and run the way the handler
runs it: through handler.fast_path's runner (same backend/precision settings) when the handler has
one, else eager fp32 torch in channels_last.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import Row
from handler.fast_path import int8_model_path, make_runner
from handler.image_input import Limits, read_request
from handler.model import load_model
from training import config as config_lib
from training import presets

TOPK = 5
MIN_BATCHES = 3  # per batch size, however slow
WARMUP_BATCHES = 1


class Pipeline:
    def __init__(self, export: Path, backend: str = "auto", precision: str = "auto"):
        self.cfg = config_lib.load(export / "config.yaml")
        weights = export / f"{self.cfg.model_name}.pth"
        model = load_model(export, weights, torch.device("cpu")).to(memory_format=torch.channels_last)
        int8 = int8_model_path(export, self.cfg.model_name)
        runner = make_runner(model, self.cfg.eval_size, backend, precision, int8)  # the handler's own path
        self.run, self.engine = runner.run, f"{runner.backend} {runner.precision}"
        self.preprocess = presets.eval_preset(self.cfg)
        self.limits = Limits()

    def __call__(self, body: bytes, batch_size: int) -> torch.Tensor:
        tensors = [self.preprocess(read_request({"body": body}, self.limits)[0]) for _ in range(batch_size)]
        probabilities = F.softmax(self.run(torch.stack(tensors)), dim=1)
        return torch.topk(probabilities, TOPK, dim=1).indices


def time_batches(pipeline: Pipeline, body: bytes, batch_size: int, seconds: float) -> list[float]:
    """Seconds per batch, for at least `seconds` and MIN_BATCHES batches, after a warm-up."""
    for _ in range(WARMUP_BATCHES):
        pipeline(body, batch_size)
    times, started = [], time.perf_counter()
    while len(times) < MIN_BATCHES or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        pipeline(body, batch_size)
        times.append(time.perf_counter() - t0)
    return times


def _percentile_ms(times: list[float], pct: int) -> float:
    if len(times) == 1:
        return times[0] * 1000
    return statistics.quantiles(times, n=100, method="inclusive")[pct - 1] * 1000


def measure(
    model_name: str, export: Path, image: Path, batch_sizes: list[int], seconds: float, engine: dict[str, str]
) -> list[Row]:
    """One row per batch size (1 always included); latencies are per batch. `engine`: backend, precision."""
    pipeline, body = Pipeline(export, **engine), image.read_bytes()
    rows = []
    for batch_size in sorted(set(batch_sizes) | {1}):
        times = time_batches(pipeline, body, batch_size, seconds)
        rows.append(
            Row(
                model=model_name,
                setup="inprocess",
                level=f"batch {batch_size}",
                img_s=batch_size * len(times) / sum(times),
                p50_ms=_percentile_ms(times, 50),
                p95_ms=_percentile_ms(times, 95),
                p99_ms=_percentile_ms(times, 99),
                errors=0,
                requests=batch_size * len(times),
                workers=1,
                batch_size=batch_size,
                input_size=pipeline.cfg.eval_size,
                engine=pipeline.engine,
                detail={"torch_threads": torch.get_num_threads()},
            )
        )
    best = max(rows, key=lambda r: r.img_s)
    for row in rows:  # the table shows batch 1 and the best; the JSON keeps the whole sweep
        row.detail["best"] = row is best
        row.detail["in_table"] = row.batch_size == 1 or row is best
        if row is best and row.batch_size != 1:
            row.level += " (best)"
    return rows
