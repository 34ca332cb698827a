"""What every part of the benchmark shares: paths, the request image, one result row."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from PIL import Image

from carmodel import paths

# The project's home (carmodel.paths: the working directory, or $CAR_CLASSIFIER_HOME), fixed when the
# benchmark starts: run it from the checkout (python -m bench.run), whose git state it records.
ROOT = paths.home()

SHARED_TRAIN = (ROOT / ".." / "shared" / "stanford_cars" / "train").resolve()
BENCH_VAR = paths.var_dir() / "bench"
MODELS_DIR = paths.models_dir()

# The request image: a real car photo close to this size (the dataset's longer side is <= 512).
TARGET_IMAGE_SIZE = (500, 300)
IMAGE_SCAN_LIMIT = 400  # files looked at (headers only) when choosing it


class BenchError(RuntimeError):
    pass


@dataclass
class Row:
    """One line of the table: a setup at one load level (HTTP concurrency, or in-process batch size)."""

    model: str
    setup: str  # stock | ours | inprocess
    level: str  # "c=8" or "batch 16"
    img_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    errors: int
    requests: int
    workers: int | None = None
    batch_size: int | None = None
    input_size: int | None = None  # side of the square tensor the model sees
    engine: str | None = None  # how the forward pass runs, e.g. "torch fp32", "openvino bf16"
    client_cpu_pct: float | None = None  # load generator's CPU, % of one core
    other_cpu_pct: float | None = None  # everyone else's CPU during the measurement, % of one core
    photo: str = ""  # the request photo: size, format, bytes (bench.photos.label)
    detail: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def pick_image(root: Path = SHARED_TRAIN, target: tuple[int, int] = TARGET_IMAGE_SIZE) -> Path:
    """The real JPEG closest to `target` among the first files (sorted: the same pick on every run)."""
    if not root.is_dir():
        raise BenchError(f"Stanford Cars images not found at {root}; pass --image PATH")
    best, best_distance = None, None
    files = (f for folder in sorted(root.iterdir()) for f in sorted(folder.glob("*.jpg")))
    for _, path in zip(range(IMAGE_SCAN_LIMIT), files, strict=False):
        with Image.open(path) as img:
            distance = abs(img.width - target[0]) + abs(img.height - target[1])
        if best_distance is None or distance < best_distance:
            best, best_distance = path, distance
    if best is None:
        raise BenchError(f"no .jpg under {root}")
    return best


def describe_image(path: Path) -> dict:
    with Image.open(path) as img:
        return {"path": str(path), "width": img.width, "height": img.height, "bytes": path.stat().st_size}


class PeakMemory:
    """The peak RSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pids: list[int]):
        self.pids, self.peak, self._stop = pids, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(pid)
                    for process in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
