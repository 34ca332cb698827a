"""Turn one TorchServe request row into an RGB PIL image, or an `InputError` that says why not.

Pure functions with no TorchServe imports, so they are tested and fuzzed in-process
(tests/test_image_input.py). Every rejection is an `InputError` with an HTTP status:

    400 malformed request (empty, bad base64, bad JSON, no image field, bad topk)
    413 too large (bytes, or pixels: decompression bombs)
    415 not an image format we accept
    422 an image, but not one we can classify (corrupt/truncated header or pixels, too small)

A request row is what TorchServe's Python worker hands the handler: a dict of parameter name
to value, where the value is bytes (raw body, multipart file, query parameter), str (a text
body) or an already-parsed JSON body (dict).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Where TorchServe puts the image: "body" for a raw body (curl -T / --data-binary), "data" for
# the stock clients' multipart field; "file"/"image" are the names people reach for in forms.
IMAGE_FIELDS = ("data", "body", "file", "image")
JSON_IMAGE_FIELDS = ("image", "data", "b64", "image_b64")
Image.init()  # register every plugin now, so the allow-list below can name them
# An allow-list: PIL also parses EPS (Ghostscript), PSD, ICO, ... that no car photo needs.
ACCEPTED_FORMATS = sorted({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"} & set(Image.OPEN))


class InputError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.status, "type": "InputError", "message": self.message}


@dataclass(frozen=True)
class Limits:
    # Below TorchServe's max_request_size (10 MiB): an oversized image gets this JSON 413, not
    # the front end's bare one. Phone photos are 2-6 MB; base64 JSON adds a third.
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000  # ~ 8000 x 5000: real photos pass, bombs do not
    min_side: int = 16  # below this there is no car to see
    max_topk: int = 196


@dataclass
class ParsedRequest:
    image_bytes: bytes
    topk: int | None


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_topk(value, limits: Limits) -> int | None:
    if value is None:
        return None
    text = _text(value).strip()
    try:
        topk = int(text)
    except ValueError:
        raise InputError(400, f"topk must be an integer, got {text[:20]!r}") from None
    if not 1 <= topk <= limits.max_topk:
        raise InputError(400, f"topk must be between 1 and {limits.max_topk}, got {topk}")
    return topk


def decode_base64(text: str, limits: Limits) -> bytes:
    if "," in text[:100] and text.lstrip().startswith("data:"):
        text = text.split(",", 1)[1]  # a data: URL, as browsers produce
    if len(text) > limits.max_bytes * 4 // 3 + 4:
        raise InputError(413, f"base64 image is larger than the {limits.max_bytes} byte limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "image field is not valid base64") from None


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_binary_content_type(content_type: str | None) -> None:
    """A binary body must not claim to be text: a client that says JSON or text and sends bytes is confused."""
    media_type = _media_type(content_type)
    if media_type == "application/json":
        raise InputError(400, "Content-Type is application/json but the body is not valid JSON")
    if media_type.startswith("text/"):
        raise InputError(
            415,
            f"Content-Type is {media_type} but the body is binary: send images as application/octet-stream or image/*",
        )


def parse_request(row: dict, limits: Limits, content_types: dict[str, str] | None = None) -> ParsedRequest:
    """`content_types`: the Content-Type TorchServe recorded for each field (the body's or a multipart part's)."""
    if not isinstance(row, dict):
        raise InputError(400, "unexpected request format")
    topk = parse_topk(row.get("topk"), limits)
    field = next((name for name in IMAGE_FIELDS if row.get(name) is not None), None)
    if field is None:
        raise InputError(
            400,
            "no image in the request: send it as the body (curl -T car.jpg), as a multipart "
            "field named 'data', or base64 in a JSON field 'image'",
        )
    value = row[field]
    if isinstance(value, dict):  # a JSON body, parsed by the worker
        key = next((k for k in JSON_IMAGE_FIELDS if k in value), None)
        if key is None or not isinstance(value[key], str):
            raise InputError(400, "JSON body needs a base64 string in the field 'image'")
        if topk is None and "topk" in value:
            topk = parse_topk(value["topk"], limits)
        return ParsedRequest(decode_base64(value[key], limits), topk)
    if isinstance(value, str):  # a text body: base64, as the stock handler accepts
        return ParsedRequest(decode_base64(value, limits), topk)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if data[:1] in (b"{", b"["):
            raise InputError(400, "body looks like JSON but is not valid JSON with an 'image' field")
        check_binary_content_type((content_types or {}).get(field))
        return ParsedRequest(data, topk)
    if isinstance(value, list):
        raise InputError(400, "JSON body must be an object with a base64 'image' field, not a list")
    raise InputError(400, f"unsupported request value of type {type(value).__name__}")


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


def decode_image(data: bytes, limits: Limits) -> Image.Image:
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


def read_request(
    row: dict, limits: Limits, content_types: dict[str, str] | None = None
) -> tuple[Image.Image, int | None]:
    parsed = parse_request(row, limits, content_types)
    return decode_image(parsed.image_bytes, limits), parsed.topk
