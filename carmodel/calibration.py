"""How much the answer can be trusted: fitted on held-out cars (training.calibrate, on the val split)
and shipped beside the weights as `calibration.json`.

* **Temperature.** A network trained with label smoothing answers its right guesses at ~0.3, so its
  softmax says nothing a person can use; dividing the logits by a temperature makes "0.9" right 9
  times in 10. How sure the network should be depends on how many pixels the car had: a car cut from
  a thumbnail is enlarged several times before it is classified. So the temperature is a function of
  the classified region's size `s` (the square root of its area, in the decoded image's pixels):
  T(s) = temperature * (s / reference_side) ** size_exponent, with `s` held inside the range fitted on.
* **No car.** The car/no-car score (the car head's sigmoid, from the first pass) below
  `car_threshold`: the answer says there is no car.
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


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0  # at reference_side
    size_exponent: float = 0.0  # 0: one temperature whatever the region's size
    reference_side: float = 224.0
    min_side: float = 1.0  # the sizes it was fitted on: outside them T(s) is held at the edge
    max_side: float = 1e6
    car_threshold: float = 0.0  # car score below this: no car (0: a car is always found)
    sure_threshold: float = 0.0  # top-1 probability below this: uncertain (0: always sure)
    make_threshold: float = 0.0  # uncertain, but the make is given at this make probability or above
    fitted_on: str = "none"  # what it was fitted on, for people reading the file

    def temperatures(self, sides: torch.Tensor) -> torch.Tensor:
        """T for regions of `sides` pixels (one per image)."""
        relative = sides.float().clamp(self.min_side, self.max_side) / self.reference_side
        return self.temperature * relative.pow(self.size_exponent)

    def probabilities(self, logits: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperatures(sides).unsqueeze(1), dim=1)

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
        return cls(**values)
