"""The served model's settings, declared once.

`WorkerSettings` is TorchServe's part of model-config.yaml (workers, batching, timeout);
`HandlerSettings` is its `handler:` section, read by our handler. The archive builder writes
both, and its command-line flags are generated from these fields, so a new setting is one line here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from carmodel.images import ImageLimits
from carmodel.runners import BACKENDS, PRECISIONS


def _setting(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class WorkerSettings:
    workers: int = _setting(1, "worker processes")
    # Chosen by bench sweeps (bench/README.md, "Tuning"): batch 8 with 5 ms gives the most img/s
    # under load short of adding latency to a lone request; 2 workers x 1 thread was slower on 2 cores.
    batch_size: int = _setting(8, "requests TorchServe batches together")
    max_batch_delay: int = _setting(5, "ms to wait to fill a batch")
    response_timeout: int = _setting(60, "s before TorchServe gives up on a worker")

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
    topk: int = _setting(5, "answers per image when the request does not ask")
    max_topk: int = _setting(0, "largest top-k a request may ask (0 = the number of classes)")
    max_bytes: int = _setting(ImageLimits.max_bytes, "largest image upload in bytes")
    max_pixels: int = _setting(ImageLimits.max_pixels, "largest image in pixels (decompression-bomb guard)")
    min_side: int = _setting(ImageLimits.min_side, "smallest image side in pixels")
    backend: str = _setting("auto", "auto = OpenVINO when installed", BACKENDS)
    precision: str = _setting(
        "auto", "auto = int8 when the export has the calibrated int8 model, else bf16 when the CPU has it", PRECISIONS
    )
    threads: int = _setting(0, "threads per worker (0 = all cores)")
    ig_steps: int = _setting(16, "Integrated Gradients steps per explanation")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_bytes, max_pixels=self.max_pixels, min_side=self.min_side)

    def largest_topk(self, num_classes: int) -> int:
        """The largest top-k a request may ask: `max_topk`, or every class when it is 0."""
        return self.max_topk or num_classes

    @classmethod
    def from_section(cls, section: dict | None) -> HandlerSettings:
        """model-config.yaml's `handler:` section; an unknown or ill-typed key is an error, not a silent default."""
        return from_dict(cls, section or {})


def from_dict(cls, values: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    typed = {}
    for name, value in values.items():
        f = fields[name]
        try:
            typed[name] = type(f.default)(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected {type(f.default).__name__}, got {value!r}") from None
        if f.metadata["choices"] and typed[name] not in f.metadata["choices"]:
            raise ValueError(f"{name} must be one of {', '.join(f.metadata['choices'])}; got {value!r}")
    return cls(**typed)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--<field>` flag per field, typed, with the field's default and help."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        group.add_argument(
            f"--{f.name}",
            type=type(f.default),
            default=f.default,
            choices=f.metadata["choices"],
            help=f.metadata["help"],
        )


def from_args(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def to_dict(settings) -> dict:
    return dataclasses.asdict(settings)
