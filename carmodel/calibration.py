"""How much the answer can be trusted: fitted on held-out cars (training.calibrate, on the val split)
and shipped beside the weights as `calibration.json`.

* **Temperature.** A network trained with label smoothing answers its right guesses at ~0.3, so its
  softmax says nothing a person can use; dividing the logits by a temperature makes "0.9" right 9
  times in 10. How sure the network should be depends on how many pixels the car had: a car cut from
  a thumbnail is enlarged several times before it is classified. So the temperature is a function of
  the classified region's size `s` (the square root of its area, in the decoded image's pixels):
  T(s) = temperature * (s / reference_side) ** size_exponent, with `s` held inside the range fitted on.
  A dark, blurred or grainy photo deserves less confidence than its softmax shows: T also rises with how
  far the classified image's quality (`image_quality`: brightness, contrast, sharpness, colour) is from
  the clean val crops', log T gaining sum(w * z + v * z**2) over its standardised features z.
* **No car.** The car score below `car_threshold`: the answer says there is no car. With a detector,
  a candidate it scores below `detect_threshold` is not even classified, and the car score of one that
  is combines the detector's and the car check's (carmodel.predictor.car_score); with only a box head,
  the car head's sigmoid from the first pass.
* **Not sure.** A top-1 probability below `sure_threshold`: the answer says it is uncertain, and
  still names the make when the make's probability (summed over its classes) reaches `make_threshold`.

A model without this file answers as it always did: temperature 1, a car always found, always sure.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

CALIBRATION = "calibration.json"
QUALITY = ("brightness", "contrast", "sharpness", "colour")


def image_quality(inputs: torch.Tensor, mean, std) -> torch.Tensor:
    """[N, 4] for a batch of classified images (normalised with `mean`, `std`): log brightness and log
    contrast of the luminance, log sharpness (mean gradient over contrast: blur lowers it, grain raises
    it) and colourfulness. Read off every second pixel (grain and blur show there as well): ~0.1 ms an image."""
    rgb = inputs[:, :, ::2, ::2].float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    luma = torch.einsum("nchw,c->nhw", rgb, torch.tensor([0.299, 0.587, 0.114]))
    brightness, contrast = luma.mean((1, 2)), luma.std((1, 2))
    gradient = (luma[:, 1:] - luma[:, :-1]).abs().mean((1, 2)) + (luma[:, :, 1:] - luma[:, :, :-1]).abs().mean((1, 2))
    colour = (rgb.amax(1) - rgb.amin(1)).mean((1, 2))
    eps = 1e-3
    return torch.stack(
        [(brightness + eps).log(), (contrast + eps).log(), (gradient / (contrast + eps)).log(), colour], 1
    )


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0  # at reference_side
    size_exponent: float = 0.0  # 0: one temperature whatever the region's size
    reference_side: float = 224.0
    min_side: float = 1.0  # the sizes it was fitted on: outside them T(s) is held at the edge
    max_side: float = 1e6
    car_threshold: float = 0.0  # car score below this: no car (0: a car is always found)
    detect_threshold: float = 0.0  # a detector's candidate scoring below this is not classified (0: car_threshold)
    sure_threshold: float = 0.0  # top-1 probability below this: uncertain (0: always sure)
    make_threshold: float = 0.0  # uncertain, but the make is given at this make probability or above
    # image quality's part of log T (empty: none): the clean val crops' mean and spread of each QUALITY
    # feature, and the weights of its standardised value and of its square
    quality_mean: tuple[float, ...] = ()
    quality_scale: tuple[float, ...] = ()
    quality_weights: tuple[float, ...] = ()
    quality_square_weights: tuple[float, ...] = ()
    fitted_on: str = "none"  # what it was fitted on, for people reading the file

    @property
    def candidate_threshold(self) -> float:
        """The detector's score a candidate needs to be classified (and checked)."""
        return self.detect_threshold or self.car_threshold

    @property
    def sees_quality(self) -> bool:
        return bool(self.quality_weights)

    def temperatures(self, sides: torch.Tensor, quality: torch.Tensor | None = None) -> torch.Tensor:
        """T for regions of `sides` pixels (one per image), of `quality` (image_quality's rows) when it counts."""
        relative = sides.float().clamp(self.min_side, self.max_side) / self.reference_side
        temperature = self.temperature * relative.pow(self.size_exponent)
        if self.sees_quality and quality is not None:
            z = (quality.float() - torch.tensor(self.quality_mean)) / torch.tensor(self.quality_scale)
            z = z.clamp(-6, 6)  # far outside anything fitted on, hold it at the edge
            temperature = (
                temperature
                * (
                    z @ torch.tensor(self.quality_weights) + z.square() @ torch.tensor(self.quality_square_weights)
                ).exp()
            )
        return temperature

    def probabilities(
        self, logits: torch.Tensor, sides: torch.Tensor, quality: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperatures(sides, quality).unsqueeze(1), dim=1)

    def with_thresholds(self, **thresholds: float) -> Calibration:
        """These thresholds instead of the fitted ones (a negative value keeps the fitted one): the
        server's settings."""
        return dataclasses.replace(self, **{k: v for k, v in thresholds.items() if v is not None and v >= 0})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """The file at `path`; the identity calibration when there is none."""
        path = Path(path)
        if not path.is_file():
            return cls()
        values = json.loads(path.read_text())
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown calibration keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
