"""Pictures without a car, kept in two sets that never meet:

* `test_pictures()`: the no-car **test** set - pictures that Python packages ship (scikit-image,
  scikit-learn, matplotlib): a cat, an astronaut, a coffee cup, a rocket, a horse, a motorcycle,
  faces, text, a landscape, microscopy, charts and maps. Evaluation and the tests measure how many
  of them are answered "no car"; nothing is trained or chosen on them.
* the **training** pictures without a car of the car detector (training.detector; `training_pictures`):
  `backgrounds` (road, buildings and sky cut from the training photos outside each car's box),
  `synthetic` pictures (noise, gradients, shapes, stripes, text) and `shuffled` training cars (a car's
  pieces, but not a car's shape); the car check (training.verifier) also sees the package pictures
  kept out of the test set (`training_package_pictures`: the LFW subset's other faces and non-faces).
"""

from __future__ import annotations

import gzip
import io
import string
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from training import data

# ----------------------------------------------------------------------------- the test set

SKIMAGE_PICTURES = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
    "page", "retina", "rocket", "shepp_logan_phantom", "text",
)  # fmt: skip
MATPLOTLIB_PICTURES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")
SKLEARN_PICTURES = ("china.jpg", "flower.jpg")
FACES = 10  # of scikit-image's small LFW faces (its subset: 100 faces, then 100 patches without one)


def _rgb(array: np.ndarray) -> Image.Image:
    """Any package image array (bool, float 0-1, uint8/16; grey or colour) -> an 8-bit image."""
    array = np.asarray(array)
    if array.dtype == bool or array.dtype.kind == "f":
        array = array.astype(np.float64)
        array = (array - array.min()) / max(array.max() - array.min(), 1e-12) * 255
    elif array.dtype != np.uint8:
        array = array.astype(np.float64) * 255 / max(array.max(), 1)
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def _colormapped(values: np.ndarray, cmap: str) -> Image.Image:
    from matplotlib import colormaps

    values = (values - values.min()) / max(values.max() - values.min(), 1e-12)
    return Image.fromarray((colormaps[cmap](values)[..., :3] * 255).astype(np.uint8))


def _chart() -> Image.Image:
    """A line chart of matplotlib's sample stock prices, as a screenshot of a chart would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    prices = cbook.get_sample_data("goog.npz")["price_data"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    ax.plot(prices["adj_close"])
    ax.set(title="GOOG", xlabel="day", ylabel="price")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Image.open(buffer).convert("RGB")


def test_pictures() -> list[tuple[str, Image.Image]]:
    """The no-car test set: (name, RGB picture), about 45 of them."""
    import skimage.data
    from matplotlib import cbook
    from sklearn.datasets import load_sample_image

    pictures = [(f"skimage:{name}", _rgb(getattr(skimage.data, name)())) for name in SKIMAGE_PICTURES]
    pictures.append(("skimage:motorcycle", _rgb(skimage.data.stereo_motorcycle()[0])))
    pictures += [(f"skimage:face{i}", _rgb(face)) for i, face in enumerate(skimage.data.lfw_subset()[:FACES])]
    pictures += [(f"sklearn:{name}", Image.fromarray(load_sample_image(name))) for name in SKLEARN_PICTURES]
    for name in MATPLOTLIB_PICTURES:
        with Image.open(cbook.get_sample_data(name)) as picture:
            pictures.append((f"matplotlib:{name}", _rgb(np.asarray(picture.convert("RGB")))))
    with gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)) as mri:
        pictures.append(("matplotlib:mri", _rgb(np.frombuffer(mri.read(), np.uint16).reshape(256, 256))))
    pictures.append(("matplotlib:topobathy", _colormapped(cbook.get_sample_data("topobathy.npz")["topo"], "terrain")))
    pictures.append(
        ("matplotlib:dem", _colormapped(cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"], "gist_earth"))
    )
    pictures.append(("matplotlib:chart", _chart()))
    return pictures


# ----------------------------------------------------------------------------- training negatives


def training_package_pictures() -> list[Image.Image]:
    """The package pictures the test set leaves out: scikit-image's LFW subset past its first faces (90 more
    faces, then 100 patches of the same photos without one)."""
    import skimage.data

    return [_rgb(face) for face in skimage.data.lfw_subset()[FACES:]]


def backgrounds(photo: Image.Image, box, margin: float = 0.1, min_side: int = 24) -> list[Image.Image]:
    """The parts of `photo` left, right, above and below the car's `box` (widened by `margin` of its
    size), each at least `min_side` px both ways."""
    x1, y1, x2, y2 = box
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    width, height = photo.size
    regions = [
        (0, 0, x1 - dx, height),
        (x2 + dx, 0, width, height),
        (0, 0, width, y1 - dy),
        (0, y2 + dy, width, height),
    ]
    regions = [tuple(round(v) for v in r) for r in regions]
    return [photo.crop(r) for r in regions if r[2] - r[0] >= min_side and r[3] - r[1] >= min_side]


def shuffled(image: Image.Image, rng: np.random.Generator, grid: int = 4) -> Image.Image:
    """`image` cut into grid x grid tiles put back in a random order: a car's pieces, not a car."""
    width, height = (image.width // grid) * grid, (image.height // grid) * grid
    tile_w, tile_h = width // grid, height // grid
    tiles = [
        image.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
        for r in range(grid)
        for c in range(grid)
    ]
    out = Image.new("RGB", (width, height))
    for slot, index in enumerate(rng.permutation(len(tiles))):
        out.paste(tiles[index], ((slot % grid) * tile_w, (slot // grid) * tile_h))
    return out


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _noise(rng, size) -> Image.Image:
    cells = rng.integers(2, 33)
    small = rng.random((cells, cells, 3)) if rng.random() < 0.5 else np.repeat(rng.random((cells, cells, 1)), 3, 2)
    return Image.fromarray((small * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def _gradient(rng, size) -> Image.Image:
    width, height = size
    angle = rng.uniform(0, 2 * np.pi)
    x, y = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    t = ((np.cos(angle) * x + np.sin(angle) * y) + 1.5) / 3
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray((a + (b - a) * t[..., None]).clip(0, 255).astype(np.uint8))


def _shapes(rng, size) -> Image.Image:
    image = Image.new("RGB", size, _colour(rng))
    draw = ImageDraw.Draw(image)
    width, height = size
    for _ in range(rng.integers(3, 40)):
        x, y = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(4, max(5, width // 2)), rng.integers(4, max(5, height // 2))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x, y, x + w, y + h), fill=_colour(rng))
        elif kind == 1:
            draw.rectangle((x, y, x + w, y + h), fill=_colour(rng))
        elif kind == 2:
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(rng.integers(3, 7))]
            draw.polygon(points, fill=_colour(rng))
        else:
            draw.line((x, y, x + w, y + h), fill=_colour(rng), width=int(rng.integers(1, 8)))
    return image


def _stripes(rng, size) -> Image.Image:
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 40)
    wave = np.sin((np.cos(angle) * x + np.sin(angle) * y) * 2 * np.pi / period)
    if rng.random() < 0.5:  # a checkerboard
        wave = wave * np.sin((-np.sin(angle) * x + np.cos(angle) * y) * 2 * np.pi / period)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    t = (wave > 0)[..., None] if rng.random() < 0.5 else ((wave + 1) / 2)[..., None]
    return Image.fromarray((a + (b - a) * t).astype(np.uint8))


def _text(rng, size) -> Image.Image:
    image = Image.new("RGB", size, _colour(rng))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(8, 40)))
    ink = _colour(rng)
    letters = np.array(list(string.ascii_letters + string.digits + "    .,"))
    for line in range(int(size[1] // max(font.size, 1)) + 1):
        words = "".join(rng.choice(letters, int(rng.integers(5, 60))))
        draw.text((int(rng.integers(-10, 10)), line * font.size), words, fill=ink, font=font)
    return image


SYNTHETIC = (_noise, _gradient, _shapes, _stripes, _text)


def synthetic(count: int, seed: int) -> Iterator[Image.Image]:
    """`count` pictures of noise, gradients, shapes, stripes and text, reproducibly from `seed`;
    some blurred or noisy, sizes and aspect ratios as photos and screenshots have them."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        side = int(rng.integers(64, 320))
        aspect = rng.uniform(0.5, 2.0)
        size = (max(16, int(side * aspect**0.5)), max(16, int(side / aspect**0.5)))
        image = SYNTHETIC[index % len(SYNTHETIC)](rng, size)
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
        if rng.random() < 0.3:
            grain = rng.normal(0, rng.uniform(3, 30), (size[1], size[0], 3))
            image = Image.fromarray((np.asarray(image, dtype=np.float64) + grain).clip(0, 255).astype(np.uint8))
        yield image


def training_pictures(cfg, samples: list[data.Sample], rng: np.random.Generator, seed: int) -> list[Image.Image]:
    """Pictures without a car from these training cars (data.Sample): a background of each one's photo
    (where its box is trusted), as many synthetic pictures again, and a third as many of the cars shuffled."""
    photos = data.uncropped(samples, cfg.data.data_root)
    pictures = []
    for photo, known in zip(photos, data.photo_boxes(photos, cfg.data.data_root), strict=True):
        if known is not None and known.match >= cfg.data.min_box_match:
            parts = backgrounds(data.load_image(photo), known.box)
            if parts:
                pictures.append(parts[int(rng.integers(len(parts)))])
    pictures += list(synthetic(len(pictures), seed))
    for sample in samples[: len(samples) // 3]:
        pictures.append(shuffled(data.load_image(sample, cfg.data.crop_to_bbox), rng, int(rng.integers(3, 5))))
    return pictures
