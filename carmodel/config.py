"""`ModelConfig`: what a trained model needs at inference, and the only configuration that ships.

Training has many more knobs (training/config.py); an export keeps just these in `model.yaml`,
so the archive and the server never see data paths, optimiser settings or tune addresses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carmodel import typed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "efficientnet_lite0"
    dropout: float = 0.2  # part of the architecture's definition (inactive at inference)
    eval_size: int = 224  # the square the eval preset resizes to
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Localise, then classify: with a box head, the whole image is first squashed to this square to
    # find the car, which is then cut from the full-resolution image and classified. 0: no box head,
    # the whole image is classified as it is.
    locate_size: int = 0
    crop_margin: float = 0.05  # widen the found box by this fraction of its size on each side
    # A car/no-car logit on the trunk's last features, so that what is not a car is answered "no car".
    # With a detector, the car check: read in the classifier's pass over each car the detector finds
    # (training.verifier trains it); in an older export without one, read in the box head's first pass.
    car_head: bool = False
    # With a box head: a car detector (carmodel.detection; training.detector trains it) finds every car
    # in the whole image letterboxed into this canvas (width, height); it replaces the box head's
    # answer. (0, 0): none.
    detect_size: tuple[int, int] = (0, 0)

    @property
    def localizes(self) -> bool:
        return self.locate_size > 0

    @property
    def detects(self) -> bool:
        return self.localizes and min(self.detect_size) > 0

    @property
    def model_name(self) -> str:
        """The served name follows the architecture: never one arch under another's name."""
        return f"{self.arch}_cars"

    def to_dict(self) -> dict:
        return typed.to_dict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        return typed.from_dict(cls, values)

    def save(self, path: str | Path) -> None:
        typed.save_yaml(self, path)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return typed.load_yaml(cls, path)
