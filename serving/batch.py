"""The requests of one TorchServe batch as they travel from preprocess to postprocess.

A module of its own because TorchServe's loader requires the handler module to define
exactly one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carmodel.images import InputError
from carmodel.predictor import Forward, Prepared
from serving.requests import Options


@dataclass
class Batch:
    size: int
    prepared: list[Prepared] = field(default_factory=list)  # the good images
    positions: list[int] = field(default_factory=list)  # request index of each good image
    options: dict[int, Options] = field(default_factory=dict)  # request index -> its k and answer shape
    errors: dict[int, InputError] = field(default_factory=dict)  # request index -> why it was refused
    forward: Forward | None = None  # the chain's outputs for the good images, in order

    def add(self, idx: int, prepared: Prepared, options: Options) -> None:
        self.positions.append(idx)
        self.prepared.append(prepared)
        self.options[idx] = options
