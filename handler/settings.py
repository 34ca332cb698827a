"""The served model's settings, declared once.

`WorkerSettings` is TorchServe's part of model-config.yaml (workers, batching, timeout);
`HandlerSettings` is its `handler:` section, read by our handler. The archive builder writes both,
and its flags are made from these fields (carmodel/typed.py), so a new setting is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from carmodel import typed
from carmodel.images import ImageLimits
from carmodel.runners import BACKENDS, PRECISIONS
from carmodel.typed import setting


@dataclass(frozen=True)
class WorkerSettings:
    workers: int = setting(1, "worker processes")
    # Chosen by bench sweeps (docs/benchmarks.md, "Tuning"): batch 8 with 5 ms gives the most img/s
    # under load short of adding latency to a lone request; 2 workers x 1 thread was slower on 2 cores.
    batch_size: int = setting(8, "requests TorchServe batches together")
    max_batch_delay: int = setting(5, "ms to wait to fill a batch")
    response_timeout: int = setting(60, "s before TorchServe gives up on a worker")

    def to_model_config(self) -> dict:
        """TorchServe's camelCase keys."""
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
        }


@dataclass(frozen=True)
class HandlerSettings:
    topk: int = setting(5, "answers per image when the request does not ask")
    max_topk: int = setting(0, "largest top-k a request may ask (0 = the number of classes)")
    max_bytes: int = setting(ImageLimits.max_bytes, "largest image upload in bytes")
    max_pixels: int = setting(ImageLimits.max_pixels, "largest image in pixels (decompression-bomb guard)")
    min_side: int = setting(ImageLimits.min_side, "smallest image side in pixels")
    backend: str = setting("auto", "auto = OpenVINO when installed", BACKENDS)
    precision: str = setting(
        "auto", "auto = int8 when the export has the calibrated int8 model, else bf16 when the CPU has it", PRECISIONS
    )
    threads: int = setting(0, "threads per worker (0 = all cores)")
    # Two 49-megapixel PNGs (~0.2 s of decoding each): what a batch may spend on images with no DCT
    # shortcut before the rest wait their turn, so a flood of them cannot starve everyone else.
    batch_decode_pixels: int = setting(
        100_000_000,
        "pixels a batch may decode; images past it are answered 503 + Retry-After (one always passes; 0 = no budget)",
    )
    max_cars: int = setting(10, "cars answered per image, most prominent first (models with a car detector)")
    # Measured in docs/benchmarks.md ("Mirrored cars"): what it adds to top-1 and what it costs.
    flip: bool = setting(False, "also classify each car mirrored and average the two answers (the classify pass twice)")
    ig_steps: int = setting(16, "Integrated Gradients steps per explanation")
    car_threshold: float = setting(
        -1.0, "car score below which a photo is answered 'no car' (-1 = the model's own, fitted on val)"
    )
    sure_threshold: float = setting(
        -1.0, "top-1 probability below which an answer is marked uncertain (-1 = the model's own, fitted on val)"
    )

    def __post_init__(self):
        if self.max_cars < 1:
            raise typed.SettingsError(f"max_cars must be at least 1, got {self.max_cars}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels, min_side=self.min_side)

    def largest_topk(self, num_classes: int) -> int:
        """The largest top-k a request may ask: `max_topk`, or every class when it is 0."""
        return self.max_topk or num_classes

    @classmethod
    def from_section(cls, section: dict | None) -> HandlerSettings:
        """model-config.yaml's `handler:` section; an unknown or ill-typed key is an error, not a silent default."""
        return typed.from_dict(cls, section, where="handler")
