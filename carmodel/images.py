"""Image bytes -> an RGB PIL image, or an `InputError` that says why not.

The first link of the inference chain, shared by the server, the benchmarks, training's
evaluation and the clients' file lists. A phone photo has far more pixels than the model looks
at, so an image is decoded no larger than the model needs (`decode_side`, from
carmodel.presets.decode_side): a JPEG at the smallest DCT scale (1/2, 1/4, 1/8) that keeps that
many pixels on its shorter side - most of a 12-megapixel JPEG's decoding is never done - and any
image still twice that size is box-averaged down (`Image.reduce`).

Every rejection carries the HTTP status a server answers with:

    400 empty
    413 too large (bytes, or pixels: decompression bombs)
    415 not an image format we accept
    422 an image, but not one we can classify (corrupt/truncated header or pixels, too small)
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from carmodel.errors import StatusError

pillow_heif.register_heif_opener()  # HEIC: what an iPhone sends by default (AVIF is Pillow's own)
Image.init()  # register every plugin now, so the allow-list below can name them
# An allow-list: PIL also parses EPS (Ghostscript), PSD, ICO, ... that no car photo needs.
ACCEPTED_FORMATS = sorted({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"} & set(Image.OPEN))
DCT_SCALED = {"JPEG", "MPO"}  # formats PIL can decode at 1/2, 1/4, 1/8 scale (Image.draft)
# Image.info key: the upload's (width, height), upright, before decoding shrank it. Boxes are
# answered in these pixels: the ones the client has.
UPLOADED_SIZE = "uploaded_size"
SUPPORTED = "JPEG, PNG, WebP, HEIC, AVIF, BMP, GIF, TIFF"  # as people know them
# File suffixes of those formats: what a folder scan (training data, the batch client) picks up.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS)


class InputError(StatusError, ValueError):
    """An upload the model cannot take: its status says why (the table above)."""


@dataclass(frozen=True)
class ImageLimits:
    # A 12-megapixel phone photo is 2-6 MB as JPEG or HEIC and 15-25 MB as PNG: 30 MiB lets the PNG
    # through. TorchServe's max_request_size is 48 MiB (config.properties), above this plus base64's
    # third, so an oversized image reaches the handler and gets a JSON 413 that names the limit.
    max_bytes: int = 30 * 1024 * 1024
    max_pixels: int = 50_000_000  # a 48-megapixel phone photo (8064 x 6048) passes, bombs do not
    min_side: int = 16  # below this there is no car to see


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode PIL reads; 16-bit and float images are scaled, not clipped to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colour; show them as a white background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def shrink_while_decoding(img: Image.Image, decode_side: int) -> None:
    """Before `load()`: a JPEG decodes at the smallest DCT scale whose shorter side keeps `decode_side` pixels."""
    factor = min(img.size) / decode_side if decode_side else 1
    if img.format in DCT_SCALED and factor >= 2:
        img.draft("RGB", (math.ceil(img.width / factor), math.ceil(img.height / factor)))


def reduce_to(img: Image.Image, decode_side: int) -> Image.Image:
    """Box-average `img` by the largest whole factor that keeps `decode_side` pixels on its shorter side."""
    factor = min(img.size) // decode_side if decode_side else 1
    return img.reduce(factor) if factor >= 2 else img


def open_image(path, decode_side: int = 0) -> Image.Image:
    """An image file, decoded no larger than `decode_side` needs (0: full size), upright, RGB.
    PIL's own errors pass through: the caller knows what a bad file means to it."""
    with Image.open(path) as img:
        return _decoded(img, decode_side)


def uploaded_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as uploaded (upright), whatever size it was decoded at."""
    return img.info.get(UPLOADED_SIZE, img.size)


def _decoded(img: Image.Image, decode_side: int) -> Image.Image:
    """An opened image -> loaded no larger than `decode_side` needs, upright, RGB, its uploaded size recorded."""
    width, height = img.size
    shrink_while_decoding(img, decode_side)
    img.load()
    upright = _upright(img)
    if (upright.width > upright.height) != (img.width > img.height):  # EXIF turned it by 90 degrees
        width, height = height, width
    out = reduce_to(_to_8bit_rgb(upright), decode_side)
    out.info[UPLOADED_SIZE] = (width, height)
    return out


def _upright(img: Image.Image) -> Image.Image:
    with contextlib.suppress(Exception):  # a broken EXIF block must not cost the user a valid photo
        return ImageOps.exif_transpose(img)
    return img


def decode_image(data: bytes, limits: ImageLimits, decode_side: int = 0) -> Image.Image:
    """`data` as an upright RGB image no larger than `decode_side` needs (0: full size)."""
    return decode_upload(open_upload(data, limits), decode_side)


def open_upload(data: bytes, limits: ImageLimits) -> Image.Image:
    """`data` opened (its header read, no pixels decoded yet) and checked against `limits`."""
    if not data:
        raise InputError(400, "empty request body: send a JPEG, PNG or WebP image")
    if len(data) > limits.max_bytes:
        raise InputError(413, f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(413, f"image has more than {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise InputError(415, f"not an image in a supported format ({SUPPORTED})") from None
    except Exception as err:  # a known format's magic bytes, then a header PIL cannot parse
        raise InputError(422, f"corrupt or truncated image header: {type(err).__name__}: {str(err)[:120]}") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InputError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise InputError(422, f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")
    return img


def decode_cost(img: Image.Image, decode_side: int = 0) -> int:
    """How many pixels decoding an opened image will produce: a JPEG's DCT scaling divides them by up
    to 64; every other format is decoded whole before it is shrunk (a 49-megapixel PNG costs ~0.2 s)."""
    factor = min(img.size) / decode_side if decode_side else 1
    if img.format in DCT_SCALED and factor >= 2:
        scale = min(8, 2 ** int(math.log2(factor)))
        return img.width * img.height // (scale * scale)
    return img.width * img.height


def decode_upload(img: Image.Image, decode_side: int = 0) -> Image.Image:
    """An image from `open_upload`, decoded no larger than `decode_side` needs, upright, RGB."""
    try:
        img.seek(0)  # animated GIF/WebP, multi-page TIFF: classify the first frame
        return _decoded(img, decode_side)
    except InputError:
        raise
    except Exception as err:  # truncated/corrupt pixel data: OSError, SyntaxError, ValueError, ...
        raise InputError(422, f"corrupt image data ({img.format}): {str(err)[:120]}") from None
