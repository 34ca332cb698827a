"""Image bytes -> an RGB PIL image, or an `InputError` that says why not.

The first link of the inference chain, shared by the server, the benchmarks and the clients'
file lists. Every rejection carries the HTTP status a server answers with:

    400 empty
    413 too large (bytes, or pixels: decompression bombs)
    415 not an image format we accept
    422 an image, but not one we can classify (corrupt/truncated header or pixels, too small)
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.init()  # register every plugin now, so the allow-list below can name them
# An allow-list: PIL also parses EPS (Ghostscript), PSD, ICO, ... that no car photo needs.
ACCEPTED_FORMATS = sorted({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"} & set(Image.OPEN))
# File suffixes of those formats: what a folder scan (training data, the batch client) picks up.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in ACCEPTED_FORMATS)


class InputError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.status, "type": "InputError", "message": self.message}


@dataclass(frozen=True)
class ImageLimits:
    # Below TorchServe's max_request_size (10 MiB): an oversized image gets a JSON 413, not
    # the front end's bare one. Phone photos are 2-6 MB; base64 JSON adds a third.
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000  # ~ 8000 x 5000: real photos pass, bombs do not
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


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
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
        raise InputError(415, "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Exception as err:  # a known format's magic bytes, then a header PIL cannot parse
        raise InputError(422, f"corrupt or truncated image header: {type(err).__name__}: {str(err)[:120]}") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise InputError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise InputError(422, f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")
    try:
        img.seek(0)  # animated GIF/WebP, multi-page TIFF: classify the first frame
        img.load()
        with contextlib.suppress(Exception):  # a broken EXIF block must not cost the user a valid photo
            img = ImageOps.exif_transpose(img)
        return _to_8bit_rgb(img)
    except InputError:
        raise
    except Exception as err:  # truncated/corrupt pixel data: OSError, SyntaxError, ValueError, ...
        raise InputError(422, f"corrupt image data ({img.format}): {str(err)[:120]}") from None
