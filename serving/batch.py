"""The requests of one TorchServe batch as they travel from preprocess to postprocess.

A module of its own because TorchServe's loader requires the handler module to define
exactly one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from carmodel.images import InputError


@dataclass
class Batch:
    size: int
    tensors: list[torch.Tensor] = field(default_factory=list)  # the good images
    positions: list[int] = field(default_factory=list)  # request index of each tensor
    topk: dict[int, int] = field(default_factory=dict)  # request index -> k
    errors: dict[int, InputError] = field(default_factory=dict)  # request index -> why it was refused
    logits: torch.Tensor | None = None

    def add(self, idx: int, tensor: torch.Tensor, topk: int) -> None:
        self.positions.append(idx)
        self.tensors.append(tensor)
        self.topk[idx] = topk
