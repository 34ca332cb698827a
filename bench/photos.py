"""The request photo at the sizes people send: the benchmark photo as it is, and re-made at a web size
and a phone's 12 megapixels, as a JPEG and a PNG; and a street scene: four copies of its car, 280-400 px
wide, side by side in a 1280x800 picture (what the detector and the per-car classification cost).

A phone photo is not an enlarged thumbnail: its sensor noise is what makes it 2-3 MB as a JPEG and
most of its decoding cost, so the enlarged photo gets seeded Gaussian noise (SENSOR_NOISE, in 8-bit
levels) before it is encoded. Made once into var/bench/photos/ and reused.

    python -m bench.run --photos benchmark web phone phone_png four_cars
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import BENCH_VAR


@dataclass(frozen=True)
class PhotoKind:
    size: tuple[int, int] | None  # None: the benchmark photo as it is
    format: str = "JPEG"
    quality: int = 90
    cars: int = 1  # more: the car pasted this many times onto a plain street of `size`


KINDS = {
    "benchmark": PhotoKind(None),
    "web": PhotoKind((1600, 1200)),
    "phone": PhotoKind((4032, 3024)),  # 12 megapixels, what most phones take by default
    "phone_png": PhotoKind((4032, 3024), "PNG"),
    "four_cars": PhotoKind((1280, 800), cars=4),
}
STREET = ((96, 96, 96), (150, 150, 150))  # the scene's background: asphalt grey to a lighter top
SENSOR_NOISE = 6.0  # standard deviation; gives a 4032x3024 q90 JPEG of ~2.5 MB, as phones send
SEED = 0


def real_world_photo(source: Path, kind: str, folder: Path = BENCH_VAR / "photos") -> Path:
    """`source` as a `kind` photo (KINDS), made on first use."""
    spec = KINDS[kind]
    if spec.size is None:
        return source
    suffix = ".png" if spec.format == "PNG" else ".jpg"
    path = folder / f"{source.stem}_{kind}_{spec.size[0]}x{spec.size[1]}{suffix}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as img:
            picture = street_scene(img.convert("RGB"), spec) if spec.cars > 1 else img.convert("RGB")
            enlarged = np.asarray(picture.resize(spec.size, Image.Resampling.BICUBIC), dtype=np.float32)
        noise = np.random.default_rng(SEED).normal(0.0, SENSOR_NOISE, enlarged.shape).astype(np.float32)
        photo = Image.fromarray(np.clip(enlarged + noise, 0, 255).astype(np.uint8))
        options = {"quality": spec.quality} if spec.format == "JPEG" else {}
        photo.save(path.with_suffix(".tmp"), spec.format, **options)
        path.with_suffix(".tmp").rename(path)
    return path


def street_scene(car: Image.Image, spec: PhotoKind) -> Image.Image:
    """`spec.cars` copies of `car` in a row across a street of `spec.size`, 280-400 px wide each."""
    width, height = spec.size
    rows = np.linspace(STREET[1], STREET[0], height)[:, None, :].repeat(width, 1)
    scene = Image.fromarray(rows.astype(np.uint8))
    slot = width // spec.cars
    for index in range(spec.cars):
        car_width = min(slot - 10, 280 + 40 * index)
        pasted = car.resize((car_width, round(car_width * car.height / car.width)), Image.Resampling.LANCZOS)
        scene.paste(pasted, (index * slot + 5, height - pasted.height - 40 * (index % 2) - 20))
    return scene


def label(path: Path) -> str:
    """What a reader of the table needs to know about the request photo: size, format, bytes."""
    with Image.open(path) as img:
        width, height, fmt = img.width, img.height, img.format
    size = path.stat().st_size
    weight = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    return f"{width}x{height} {fmt} {weight}"
