"""The ceiling: what the handler's work costs in this process, with no HTTP and no TorchServe.

Per batch, the handler's own chain (handler.chain.ServedChain, built from the same HandlerSettings:
image limits, decoding budget, backend, precision, threads, thresholds): each body opened, the batch's
images decoded and cut out side by side in the chain's thread pool, the forward passes, the answers.
Only reading TorchServe's request rows is left out: the bodies are the photo's bytes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.common import Row
from carmodel.export import ExportDir
from carmodel.images import InputError
from carmodel.predictor import Answer
from handler.chain import ServedChain
from handler.settings import HandlerSettings

MIN_BATCHES = 3  # per batch size, however slow
WARMUP_BATCHES = 1


class Pipeline:
    """The served chain over raw bodies, failing loudly: a benchmark's photo must be answered."""

    def __init__(self, export: ExportDir, settings: HandlerSettings | None = None):
        self.chain = ServedChain.for_export(export, settings)

    @property
    def engine(self) -> str:
        return self.chain.predictor.engine

    @property
    def input_size(self) -> int:
        return self.chain.predictor.config.eval_size

    def answers(self, bodies: list[bytes]) -> list[Answer]:
        answers = self.chain.answer_bytes(bodies)
        refused = [a for a in answers if isinstance(a, InputError)]
        if refused:
            raise refused[0]
        return answers

    def rows(self, bodies: list[bytes]) -> list[list[dict]]:
        """The plain answer (top-k rows) of each body: what the peer servers (bench/peer_apps.py) answer."""
        return [answer.rows() for answer in self.answers(bodies)]

    def __call__(self, body: bytes, batch_size: int) -> list[Answer]:
        return self.answers([body] * batch_size)

    @classmethod
    def for_peer(cls, export: str, threads: int) -> Pipeline:
        """A peer server's chain: the export at `export`, the handler's default settings on `threads` threads."""
        return cls(ExportDir(Path(export)), HandlerSettings(threads=threads))


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
