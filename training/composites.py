"""Pictures with several cars at any size, built reproducibly: what the car detector trains and is tested on.

A scene pastes 0-6 held-apart or overlapping cars (crops of one split, each 48 px wide up to the whole
picture, at random places) onto a background, their edges feathered so that a crop's rectangle is not
what marks a car. Backgrounds never cross from training to testing:

* training: the surroundings of the training split's whole photos outside their car's box (road,
  buildings, sky; tiled and enlarged to the picture) and procedural textures (training/nocar.synthetic);
* testing: the test split's photos' surroundings and the pictures Python packages ship
  (training/nocar.test_pictures), which nothing is ever trained on.

Cars may overlap, as in a car park, but a car is never placed where it would hide more than half of
one already there: every car shown is one to find, and its box is the whole car's.

    python -m training.composites --split test --count 12 --out var/composites   # a look at the test scenes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from carmodel.errors import exit_with
from training import config as config_lib
from training import data, nocar

log = logging.getLogger(__name__)

SIZES = ((1280, 800), (1024, 768), (800, 800), (768, 1024), (1280, 720), (640, 480))
MIN_CAR_WIDTH = 48
MAX_CARS = 6
MIN_VISIBLE = 0.5  # of each car, whatever is pasted over it


@dataclass
class Scene:
    image: Image.Image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x1, y1, x2, y2, pixels
    labels: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"size": list(self.image.size), "boxes": [list(b) for b in self.boxes], "labels": self.labels}


class Backgrounds:
    """Background pictures of one side of the split: `train` or `test` (see the module's docstring)."""

    def __init__(self, cfg, split: str, samples: list[data.Sample], seed: int):
        self.rng = np.random.default_rng(seed)
        photos = data.uncropped(samples, cfg.data.data_root)
        self.surroundings = []
        for photo, known in zip(photos, data.photo_boxes(photos, cfg.data.data_root), strict=True):
            if known is not None and known.match >= cfg.data.min_box_match:
                self.surroundings += nocar.backgrounds(data.load_image(photo), known.box, min_side=32)
        if split == "train":
            self.others = list(nocar.synthetic(200, seed))
        else:
            self.others = [picture for _, picture in nocar.test_pictures()]

    def draw(self, size: tuple[int, int]) -> Image.Image:
        """A background of `size`: half the time surroundings tiled 1-3 across, else another picture."""
        if self.surroundings and self.rng.random() < 0.5:
            across = int(self.rng.integers(1, 4))
            canvas = Image.new("RGB", (across * 160, 120))
            for slot in range(across):
                part = self.surroundings[int(self.rng.integers(len(self.surroundings)))]
                canvas.paste(part.resize((160, 120), Image.Resampling.BICUBIC), (slot * 160, 0))
            return canvas.resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1))
        picture = self.others[int(self.rng.integers(len(self.others)))]
        return picture.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def feathered(size: tuple[int, int], share: float = 0.08) -> Image.Image:
    """An alpha mask that fades a pasted crop's border into the background over `share` of its size."""
    width, height = size
    inset = max(1, round(share * min(width, height)))
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((inset, inset, width - inset, height - inset), radius=inset, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(inset / 2))


def visible_share(box, later: list) -> float:
    """How much of `box` no box in `later` covers (sampled on a grid: boxes pasted over it may overlap)."""
    x1, y1, x2, y2 = box
    xs, ys = np.meshgrid(np.linspace(x1, x2, 24), np.linspace(y1, y2, 24))
    hidden = np.zeros_like(xs, dtype=bool)
    for a1, b1, a2, b2 in later:
        hidden |= (xs >= a1) & (xs <= a2) & (ys >= b1) & (ys <= b2)
    return float(1 - hidden.mean())


def compose(
    cars: list[data.Sample], backgrounds: Backgrounds, rng: np.random.Generator, crop_to_bbox: bool, count: int
) -> Scene:
    """One scene of `count` cars drawn from `cars`."""
    size = SIZES[int(rng.integers(len(SIZES)))]
    image = backgrounds.draw(size)
    placed: list[tuple[tuple[float, float, float, float], int]] = []
    for _ in range(count):
        sample = cars[int(rng.integers(len(cars)))]
        crop = data.load_image(sample, crop_to_bbox)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # widths log-uniform from the smallest car asked for to the whole picture: small cars as often as big
        width = int(np.exp(rng.uniform(np.log(MIN_CAR_WIDTH), np.log(size[0]))))
        height = max(8, round(width * crop.height / crop.width))
        if height > size[1]:
            width, height = max(MIN_CAR_WIDTH, round(size[1] * crop.width / crop.height)), size[1]
        box = place((width, height), size, [b for b, _ in placed], rng)
        if box is None:
            continue
        crop = crop.resize((width, height), Image.Resampling.LANCZOS)
        image.paste(crop, (int(box[0]), int(box[1])), feathered((width, height)))
        placed.append((box, sample.label))
    return Scene(image, [b for b, _ in placed], [label for _, label in placed])


def place(car: tuple[int, int], size: tuple[int, int], placed: list, rng: np.random.Generator, tries: int = 10):
    """A box for a `car` (width, height) in a picture of `size` that leaves every car already `placed` at
    least MIN_VISIBLE visible (cars may overlap, as in a car park, but each stays one to find); None
    when `tries` random places all hide one."""
    width, height = car
    for _ in range(tries):
        x, y = int(rng.integers(0, size[0] - width + 1)), int(rng.integers(0, size[1] - height + 1))
        box = (float(x), float(y), float(x + width), float(y + height))
        if all(visible_share(earlier, [box, *placed[i + 1 :]]) >= MIN_VISIBLE for i, earlier in enumerate(placed)):
            return box
    return None


def scenes(cfg, split: str, count: int, seed: int = 0) -> Iterator[Scene]:
    """`count` scenes of `split`'s cars on `split`'s backgrounds (0 to MAX_CARS cars each), from `seed`."""
    samples = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)[split]
    return scenes_of(cfg, samples, "test" if split == "test" else "train", count, seed)


def scenes_of(cfg, samples: list[data.Sample], side: str, count: int, seed: int = 0) -> Iterator[Scene]:
    """`count` scenes of these cars on the `side` ("train" or "test") backgrounds, from `seed`."""
    backgrounds = Backgrounds(cfg, side, samples, seed)
    rng = np.random.default_rng(seed + 1)
    for _ in range(count):
        yield compose(samples, backgrounds, rng, cfg.data.crop_to_bbox, int(rng.integers(0, MAX_CARS + 1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_root", default=config_lib.DataConfig().data_root)
    parser.add_argument("--out", required=True, help="folder for the scenes (JPEG) and their boxes (scenes.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = config_lib.override(config_lib.Config(), data_root=args.data_root)
        records = {}
        for index, scene in enumerate(scenes(cfg, args.split, args.count, args.seed)):
            name = f"{args.split}_{index:04d}.jpg"
            scene.image.save(out / name, quality=90)
            records[name] = scene.to_dict()
    except (data.DatasetError, config_lib.ConfigError) as err:
        return exit_with(err)
    (out / "scenes.json").write_text(json.dumps(records, indent=1))
    print(out / "scenes.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
