"""A corpus of bad uploads, generated from one real car photo, each with the answer it must get.

Used over HTTP by tests/test_robustness.py (one by one, mixed into batches, and under load).
Every case is a request TorchServe passes on to the handler; the handler must answer it with
its own 4xx JSON error. (Two inputs the Java front end refuses before any handler sees them,
a body over max_request_size and a binary form-urlencoded body, are tested on their own.)
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field

from helpers import encode, jpeg_declaring, png_declaring
from PIL import Image

OCTET = {"Content-Type": "application/octet-stream"}


@dataclass(frozen=True)
class Case:
    name: str
    status: int  # the HTTP status (and JSON "code") the handler must answer with
    data: bytes | None = None  # raw body
    headers: dict = field(default_factory=lambda: dict(OCTET))
    files: dict | None = None  # multipart fields, as requests takes them

    def request_kwargs(self) -> dict:
        if self.files is not None:
            return {"files": self.files}
        return {"data": self.data, "headers": self.headers}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_bad_crc(img: Image.Image) -> bytes:
    data = bytearray(encode(img, "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # a flipped byte inside the compressed pixels; the chunk CRC no longer matches
    return bytes(data)


def png_with_garbage_idat(img: Image.Image) -> bytes:
    """Chunks with valid CRCs, but the pixel stream is not zlib at all."""
    raw = encode(img, "PNG")
    ihdr_end = 8 + 25
    return raw[:ihdr_end] + _png_chunk(b"IDAT", b"\x00" * 64 + b"not zlib" * 8) + _png_chunk(b"IEND", b"")


def png_without_idat(img: Image.Image) -> bytes:
    raw = encode(img, "PNG")
    return raw[: 8 + 25] + _png_chunk(b"IEND", b"")


def gif_truncated(img: Image.Image) -> bytes:
    data = encode(img.convert("P"), "GIF")
    return data[: len(data) // 3]


def tiff_truncated(img: Image.Image) -> bytes:
    data = encode(img, "TIFF")
    return data[: len(data) // 2]


def webp_truncated(img: Image.Image) -> bytes:
    data = encode(img, "WEBP")
    return data[: len(data) // 2]


def minimal_pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="640" height="480">'
    b'<rect width="640" height="480" fill="red"/></svg>'
)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath 0 0 moveto 100 100 lineto stroke\nshowpage\n"


def corpus(photo: bytes, max_bytes: int) -> list[Case]:
    """The bad uploads. `photo` is a real car JPEG; `max_bytes` the handler's byte limit."""
    rng = random.Random(0)  # seeded: a random body that happened to start with "{" would be a JSON error
    with Image.open(io.BytesIO(photo)) as img:
        car = img.convert("RGB")
    small = car.resize((64, 48))
    b64 = base64.b64encode(photo).decode()
    cases = [
        # --- not an image at all
        Case("empty_body", 400, b""),
        Case("random_bytes", 415, rng.randbytes(8192)),
        Case("zero_bytes", 415, bytes(4096)),
        Case("plain_text", 415, b"this is a car, honestly"),
        Case("html", 415, b"<!doctype html><html><body><img src=car.jpg></body></html>"),
        Case("svg", 415, SVG),
        Case("svg_as_image_svg", 415, SVG, {"Content-Type": "image/svg+xml"}),
        Case("pdf", 415, minimal_pdf()),
        Case("eps_never_reaches_ghostscript", 415, EPS),
        Case("gzip", 415, gzip.compress(photo)),
        Case("zip", 415, b"PK\x03\x04" + rng.randbytes(200)),
        Case("ico_not_accepted", 415, encode(small.resize((32, 32)), "ICO")),
        # --- JSON bodies
        Case("json_without_image", 400, json.dumps({"picture": b64}).encode(), {"Content-Type": "application/json"}),
        Case("json_list", 400, b"[1, 2, 3]", {"Content-Type": "application/json"}),
        Case(
            "json_bad_base64",
            400,
            json.dumps({"image": "!!not base64!!"}).encode(),
            {"Content-Type": "application/json"},
        ),
        Case("json_image_not_a_string", 400, b'{"image": 12345}', {"Content-Type": "application/json"}),
        Case("json_truncated", 400, json.dumps({"image": b64})[:200].encode(), {"Content-Type": "application/json"}),
        Case(
            "json_base64_of_text",
            415,
            json.dumps({"image": base64.b64encode(b"hello").decode()}).encode(),
            {"Content-Type": "application/json"},
        ),
        Case("text_body_bad_base64", 400, b"%%% definitely not base64 %%%", {"Content-Type": "text/plain"}),
        # --- the wrong content type for the body
        Case("jpeg_sent_as_json", 400, photo, {"Content-Type": "application/json"}),
        Case("jpeg_sent_as_text", 415, photo, {"Content-Type": "text/plain"}),
        # --- broken images
        Case("jpeg_header_only", 422, photo[:600]),
        Case("jpeg_truncated_10pct", 422, photo[: len(photo) // 10]),
        Case("jpeg_truncated_50pct", 422, photo[: len(photo) // 2]),
        Case("jpeg_truncated_90pct", 422, photo[: len(photo) * 9 // 10]),
        Case("jpeg_soi_only", 415, photo[:2]),
        Case("png_bad_crc", 422, png_with_bad_crc(small)),
        Case("png_garbage_idat", 422, png_with_garbage_idat(small)),
        Case("png_without_idat", 422, png_without_idat(small)),
        Case("gif_truncated", 422, gif_truncated(small)),
        Case("tiff_truncated", 422, tiff_truncated(small)),
        Case("webp_truncated", 422, webp_truncated(small)),
        # --- images we will not classify
        Case("one_pixel", 422, encode(Image.new("RGB", (1, 1)), "PNG")),
        Case("sliver_4000x2", 422, encode(Image.new("RGB", (4000, 2)), "PNG")),
        Case("png_bomb_100k_square", 413, png_declaring(100_000, 100_000)),
        Case("jpeg_bomb_65k_square", 413, jpeg_declaring(photo, 65_000, 65_000)),
        Case("over_handler_byte_limit", 413, photo + bytes(max_bytes)),
        # --- multipart
        Case("multipart_without_file", 400, files={"topk": (None, "3")}),
        Case("multipart_empty_file", 400, files={"data": ("car.jpg", b"", "image/jpeg")}),
        Case("multipart_text_file", 415, files={"data": ("car.jpg", b"not a picture", "image/jpeg")}),
        # --- bad parameters around a good photo
        Case("bad_topk_header", 400, photo, {**OCTET, "X-Top-K": "many"}),
        Case("topk_out_of_range", 400, photo, {**OCTET, "X-Top-K": "1000"}),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
