"""The ceiling: what the handler's work costs in this process, with no HTTP and no TorchServe.

Per batch, exactly the handler's steps through the same code: each request row read and decoded
(serving.requests.read_request, with the handler's image limits), then carmodel's chain for the
batch (carmodel.predictor.Predictor, built as the worker builds it: same backend, precision and
threads): preset, [find and cut out the car], forward pass, top-k. A batch's images are decoded
and cut out in a thread pool of the handler's size, as the handler does: a phone photo's decoding
is most of its cost, and one thread would leave a core idle.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import Row
from bench.loadgen import CONTENT_TYPE
from carmodel.export import ExportDir
from carmodel.predictor import Answer, Predictor
from serving.requests import read_request
from serving.settings import HandlerSettings

REQUEST_CONTENT_TYPES = {"body": CONTENT_TYPE}  # what TorchServe records for hey's raw body
MIN_BATCHES = 3  # per batch size, however slow
WARMUP_BATCHES = 1


class Pipeline:
    def __init__(self, export: ExportDir, settings: HandlerSettings | None = None):
        self.settings = settings or HandlerSettings()
        s = self.settings
        self.predictor = Predictor.for_export(export, s.backend, s.precision, s.threads)
        self.limits = s.image_limits
        self.max_topk = s.largest_topk(len(self.predictor.classes))
        self.pool = ThreadPoolExecutor(s.threads or os.cpu_count() or 1, thread_name_prefix="decode")

    @property
    def engine(self) -> str:
        return self.predictor.engine

    @property
    def input_size(self) -> int:
        return self.predictor.config.eval_size

    def _prepare(self, body: bytes):
        request = read_request(
            {"body": body}, self.limits, self.max_topk, REQUEST_CONTENT_TYPES, self.predictor.decode_side
        )
        return self.predictor.prepare(request.image), request.options.topk or self.settings.topk

    def answers(self, bodies: list[bytes]) -> list[Answer]:
        prepared, topks = zip(*self.pool.map(self._prepare, bodies), strict=True)
        return self.predictor.answer(self.predictor.run(prepared, map=self.pool.map), list(topks))

    def __call__(self, body: bytes, batch_size: int) -> list[Answer]:
        return self.answers([body] * batch_size)


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
    model_name: str,
    export: ExportDir,
    image: Path,
    batch_sizes: list[int],
    seconds: float,
    settings: HandlerSettings | None = None,
) -> list[Row]:
    """One row per batch size (1 always included); latencies are per batch. `settings`: the handler's."""
    pipeline, body = Pipeline(export, settings), image.read_bytes()
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
                input_size=pipeline.input_size,
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
