"""serving/requests.py and carmodel/images.py in-process: request parsing, rejections with the right status, every
image mode to sane RGB, and a fuzz test that nothing but an RGB image or an InputError comes out.

Real car photos from ../shared/stanford_cars; synthetic images only where a mode or a defect
must be made on purpose. The fuzz test's example count is FUZZ_EXAMPLES (default 300):

    FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_requests.py -k fuzz
"""

from __future__ import annotations

import base64
import io
import os
import random
import struct
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import encode, png_declaring
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from carmodel.images import (
    ACCEPTED_FORMATS,
    IMAGE_SUFFIXES,
    ImageLimits,
    InputError,
    decode_cost,
    decode_image,
    open_upload,
    uploaded_size,
)
from handler.inputs import Options, explain_target, parse_request, read_row

LIMITS = ImageLimits()
MAX_TOPK = 196  # the number of classes: the handler's default largest top-k
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
ERROR_STATUSES = {400, 413, 415, 422}


# ---------------------------------------------------------------------------- helpers


@dataclass
class ImageRequest:
    image: Image.Image
    options: Options


def read_request(
    row: dict, limits: ImageLimits, max_topk: int, content_types: dict | None = None, decode_side: int = 0
) -> ImageRequest:
    """A row parsed and its image decoded at once (`decode_side`: as the Predictor asks; 0: full size)."""
    parsed = parse_request(row, limits, max_topk, content_types)
    return ImageRequest(decode_image(parsed.image_bytes, limits, decode_side), parsed.options)


def decode(data: bytes, limits: ImageLimits = LIMITS) -> Image.Image:
    return read_request({"body": data}, limits, MAX_TOPK).image


def status_of(row: dict, limits: ImageLimits = LIMITS, max_topk: int = MAX_TOPK) -> int:
    with pytest.raises(InputError) as info:
        read_request(row, limits, max_topk)
    assert info.value.to_json()["code"] == info.value.status
    assert info.value.message
    return info.value.status


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img, dtype=np.int16)


def jpeg_scan_offset(data: bytes) -> int:
    """Where the entropy-coded data starts (after the SOS segment): cut before it, no header."""
    sos = data.index(b"\xff\xda")
    (length,) = struct.unpack(">H", data[sos + 2 : sos + 4])
    return sos + 2 + length


# ---------------------------------------------------------------------------- request parsing


@pytest.mark.parametrize("field", ["body", "data", "file", "image"])
def test_raw_bytes_in_any_image_field(photo, field):
    parsed = parse_request({field: photo}, LIMITS, MAX_TOPK)
    assert parsed.image_bytes == photo
    assert parsed.options.topk is None


def test_bytearray_body(photo):
    assert parse_request({"body": bytearray(photo)}, LIMITS, MAX_TOPK).image_bytes == photo


def test_data_field_wins_over_body(photo):
    """The stock clients' multipart field is preferred; an unrelated body does not shadow it."""
    assert parse_request({"data": photo, "body": b"junk"}, LIMITS, MAX_TOPK).image_bytes == photo


@pytest.mark.parametrize("key", ["image", "data", "b64", "image_b64"])
def test_json_body_with_base64(photo, key):
    parsed = parse_request({"body": {key: base64.b64encode(photo).decode()}}, LIMITS, MAX_TOPK)
    assert parsed.image_bytes == photo


def test_json_body_with_data_url_and_topk(photo):
    url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    parsed = parse_request({"body": {"image": url, "topk": 3}}, LIMITS, MAX_TOPK)
    assert parsed.image_bytes == photo
    assert parsed.options.topk == 3


def test_base64_text_body_with_line_breaks(photo):
    text = base64.encodebytes(photo).decode()  # wrapped at 76 columns, as `base64` prints it
    assert "\n" in text
    assert parse_request({"body": text}, LIMITS, MAX_TOPK).image_bytes == photo


def test_real_photos_decode_to_the_same_pixels_as_pil(car_images):
    for path in car_images.values():
        data = path.read_bytes()
        request = read_request({"body": data}, LIMITS, MAX_TOPK)
        image, topk = request.image, request.options.topk
        with Image.open(path) as ref:
            expected = ref.convert("RGB")
        assert topk is None
        assert image.mode == "RGB" and image.size == expected.size
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize(("value", "expected"), [(b"3", 3), ("7", 7), (b" 12 \n", 12), (1, 1), (196, 196)])
def test_topk_parsed_from_row(photo, value, expected):
    assert parse_request({"body": photo, "topk": value}, LIMITS, MAX_TOPK).options.topk == expected


def test_row_topk_wins_over_json_topk(photo):
    body = {"image": base64.b64encode(photo).decode(), "topk": 9}
    assert parse_request({"body": body, "topk": b"2"}, LIMITS, MAX_TOPK).options.topk == 2


@pytest.mark.parametrize("value", [b"abc", b"", b"2.5", b"0", b"-1", b"197", b"1e9", "three"])
def test_bad_topk_is_400(photo, value):
    assert status_of({"body": photo, "topk": value}) == 400


def test_bad_topk_in_json_is_400(photo):
    body = {"image": base64.b64encode(photo).decode(), "topk": 0}
    assert status_of({"body": body}) == 400


@pytest.mark.parametrize("flag", ["box", "details"])
@pytest.mark.parametrize(
    ("value", "expected"), [(b"1", True), (b"true", True), ("Yes", True), (True, True), (b"0", False), ("false", False)]
)
def test_answer_shape_flags_parsed_from_row_and_json(photo, flag, value, expected):
    assert getattr(parse_request({"body": photo, flag: value}, LIMITS, MAX_TOPK).options, flag) is expected
    body = {"image": base64.b64encode(photo).decode(), flag: value}
    assert getattr(parse_request({"body": body}, LIMITS, MAX_TOPK).options, flag) is expected


def test_answer_shape_not_asked_for_is_none(photo):
    options = parse_request({"body": photo}, LIMITS, MAX_TOPK).options
    assert options.box is None and options.details is None


@pytest.mark.parametrize("flag", ["box", "details"])
@pytest.mark.parametrize("value", [b"maybe", b"2", b""])
def test_bad_answer_shape_flag_is_400(photo, flag, value):
    assert status_of({"body": photo, flag: value}) == 400


def test_headers_stand_in_for_fields_and_a_field_wins(photo):
    """curl -T sends no fields: X-Top-K, X-Box and X-Details do their work; gRPC's per-field dicts are not headers."""
    headers = {"X-Top-K": "3", "x-details": "true", "X-Box": "1", "body": {"content-type": "image/jpeg"}}
    options = read_row({"body": photo}, headers, LIMITS, MAX_TOPK, default_topk=5).options
    assert (options.topk, options.details, options.box) == (3, True, True)
    assert read_row({"body": photo, "topk": b"2"}, headers, LIMITS, MAX_TOPK, default_topk=5).options.topk == 2
    assert read_row({"body": photo}, {}, LIMITS, MAX_TOPK, default_topk=5).options.topk == 5


def test_a_text_content_type_on_a_binary_body_is_415(photo):
    with pytest.raises(InputError) as info:
        read_row({"body": photo}, {"body": {"content-type": "text/plain"}}, LIMITS, MAX_TOPK, default_topk=5)
    assert info.value.status == 415


@pytest.mark.parametrize(("row", "expected"), [({"target": b"12"}, 12), ({"target": 3}, 3), ({"target": b"x"}, None)])
def test_explain_target(row, expected):
    assert explain_target(row) == expected and explain_target(b"raw") is None


def test_topk_limit_follows_limits(photo):
    assert status_of({"body": photo, "topk": b"11"}, max_topk=10) == 400
    assert parse_request({"body": photo, "topk": b"10"}, LIMITS, max_topk=10).options.topk == 10


@pytest.mark.parametrize(
    "row",
    [
        {},
        {"body": None},
        {"topk": b"3"},
        {"body": b""},
        {"body": ""},
        {"body": {}},  # JSON without an image
        {"body": {"image": 42}},
        {"body": {"picture": "aGVsbG8="}},
        {"body": [1, 2, 3]},  # a JSON list
        {"body": b'{"image": "not parsed by the worker"}'},
        {"body": b"[1, 2]"},
        {"body": "this is not base64!"},
        {"body": {"image": "abc"}},  # bad padding
        {"body": 3.14},
    ],
    ids=repr,
)
def test_malformed_requests_are_400(row):
    assert status_of(row) == 400


def test_row_that_is_not_a_dict_is_400():
    with pytest.raises(InputError) as info:
        parse_request([b"bytes"], LIMITS, MAX_TOPK)
    assert info.value.status == 400


# ---------------------------------------------------------------------------- not images: 415


@pytest.mark.parametrize(
    "data",
    [
        random.Random(0).randbytes(4096),  # seeded: unseeded bytes start with "{" 1 time in 128 (a JSON error)
        bytes(range(256)) * 8,
        b"hello, this is a car",
        b"<!DOCTYPE html><html><body><img src=car.jpg></body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
        b'<rect width="64" height="64" fill="red"/></svg>',
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" + b"\x00" * 512,
        b"PK\x03\x04" + b"\x00" * 200,  # a zip (also what a .mar is)
        b"\xff\xd8\xff",  # a JPEG's first marker, nothing else
        b"\x89PNG\r\n\x1a\n",  # a PNG signature alone
    ],
    ids=["random", "all-bytes", "text", "html", "svg", "pdf", "zip", "jpeg-soi", "png-signature"],
)
def test_non_images_are_415(data):
    assert status_of({"body": data}) == 415


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA", "PCX", "SGI"])
def test_formats_outside_the_allow_list_are_415(fmt):
    """PIL reads these, but they are not accepted (smaller attack surface, no car photo needs them)."""
    assert fmt not in ACCEPTED_FORMATS
    data = encode(Image.new("RGB", (32, 32), (200, 10, 10)), fmt)
    assert status_of({"body": data}) == 415


def test_allow_list_is_the_documented_one():
    assert set(ACCEPTED_FORMATS) <= {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"}
    assert {"JPEG", "PNG", "WEBP", "HEIF", "AVIF"} <= set(ACCEPTED_FORMATS)
    assert {".heic", ".heif", ".avif"} <= IMAGE_SUFFIXES  # folder scans and the batch client pick them up


# ---------------------------------------------------------------------------- broken images: 422


def test_truncated_jpeg_after_the_header_is_422(photo):
    scan = jpeg_scan_offset(photo)
    for cut in (scan + 1, scan + 100, len(photo) // 2, len(photo) * 9 // 10, len(photo) - 100):
        assert status_of({"body": photo[:cut]}) == 422, cut


def test_truncated_jpeg_inside_the_header_is_422(photo):
    """JPEG's magic bytes and then a header cut short: a broken JPEG, not an unknown format."""
    scan = jpeg_scan_offset(photo)
    for cut in (scan // 2, scan - 1):
        assert status_of({"body": photo[:cut]}) == 422, cut


def test_a_few_bytes_of_jpeg_are_not_an_image_yet_415(photo):
    """Too little for PIL's JPEG parser to claim the file: no format identified."""
    for cut in (2, 4, 20):
        assert status_of({"body": photo[:cut]}) == 415, cut


def test_truncated_png_is_422(car_rgb):
    data = encode(car_rgb, "PNG")
    for cut in (len(data) // 3, len(data) // 2, len(data) - 500):
        assert status_of({"body": data[:cut]}) == 422, cut


def test_corrupt_png_idat_chunk_is_422(car_rgb):
    data = bytearray(encode(car_rgb.resize((96, 64)), "PNG"))
    idat = data.index(b"IDAT")
    for offset in (6, 30, 200):
        broken = bytearray(data)
        broken[idat + offset] ^= 0xFF
        assert status_of({"body": bytes(broken)}) == 422, offset


def test_corrupt_png_header_chunk_is_415():
    data = bytearray(encode(Image.new("RGB", (32, 32)), "PNG"))
    data[18] ^= 0x01  # width changes, IHDR CRC no longer matches
    assert status_of({"body": bytes(data)}) == 415


@pytest.mark.parametrize("size", [(1, 1), (15, 200), (200, 15), (8, 8)])
def test_too_small_is_422(size):
    assert status_of({"body": encode(Image.new("RGB", size, (255, 0, 0)), "PNG")}) == 422


def test_smallest_accepted_size():
    assert decode(encode(Image.new("RGB", (16, 16), (255, 0, 0)), "PNG")).size == (16, 16)


# ---------------------------------------------------------------------------- too large: 413


@pytest.mark.parametrize("size", [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (20_000, 20_000), (9000, 6000)])
def test_decompression_bomb_png_is_413(size):
    """A ~100-byte PNG that declares billions of pixels is refused before any pixel is allocated."""
    data = png_declaring(*size)
    assert len(data) < 200
    assert status_of({"body": data}) == 413


def test_pixel_limit_follows_limits():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    assert decode(data, ImageLimits(max_pixels=300 * 200)).size == (300, 200)
    assert status_of({"body": data}, ImageLimits(max_pixels=300 * 200 - 1)) == 413


def test_over_max_bytes_is_413(photo):
    assert status_of({"body": photo}, ImageLimits(max_bytes=len(photo) - 1)) == 413
    assert decode(photo, ImageLimits(max_bytes=len(photo))).mode == "RGB"


def test_over_max_bytes_in_base64_is_413(photo):
    text = base64.b64encode(photo).decode()
    assert status_of({"body": text}, ImageLimits(max_bytes=len(photo) // 2)) == 413
    assert status_of({"body": {"image": text}}, ImageLimits(max_bytes=len(photo) // 2)) == 413


# ---------------------------------------------------------------------------- every mode to RGB


def test_grayscale_l():
    out = pixels(decode(encode(Image.new("L", (32, 32), 100), "PNG")))
    assert (out == 100).all()


def test_bilevel_1():
    img = Image.new("1", (32, 32), 0)
    img.paste(1, (0, 0, 32, 16))
    out = pixels(decode(encode(img, "PNG")))
    assert (out[:16] == 255).all() and (out[16:] == 0).all()


def test_la_transparent_is_white():
    img = Image.new("LA", (32, 32), (50, 255))
    img.paste((50, 0), (0, 0, 32, 16))
    out = pixels(decode(encode(img, "PNG")))
    assert (out[:16] == 255).all()
    assert (out[16:] == 50).all()


def test_rgba_transparent_is_white_and_opaque_keeps_colour():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black: must not turn black
    img.paste((200, 30, 40, 255), (0, 16, 32, 32))
    img.paste((200, 30, 40, 128), (0, 8, 32, 16))
    out = pixels(decode(encode(img, "PNG")))
    assert (out[:8] == 255).all()
    assert (out[16:] == (200, 30, 40)).all()
    half = out[8:16].reshape(-1, 3)  # half-transparent red over white
    assert np.allclose(half, (227, 142, 147), atol=2)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan
    img.paste((0, 0, 0, 0), (0, 16, 32, 32))  # no ink: white
    data = encode(img, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    out = pixels(decode(data))
    assert np.allclose(out[:12].reshape(-1, 3).mean(0), (0, 255, 255), atol=8)
    assert np.allclose(out[20:].reshape(-1, 3).mean(0), (255, 255, 255), atol=8)


def test_palette_with_transparency_png():
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (0, 16, 32, 32))
    out = pixels(decode(encode(img, "PNG", transparency=1)))
    assert (out[:16] == (255, 0, 0)).all()
    assert (out[16:] == 255).all()  # the transparent blue index shows as white


def test_palette_without_transparency():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    assert (pixels(decode(encode(img, "PNG"))) == (0, 0, 255)).all()


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (32, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode.startswith("I")
    out = pixels(decode(data))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()
    row = out[0, :, 0]
    expected = ramp[0] * 255.0 / 65535.0
    assert np.abs(row - expected).max() <= 1.0
    assert row.max() < 240  # not saturated to white
    assert (np.diff(row) >= 0).all() and row[0] == 0


def test_32_bit_integer_tiff_is_scaled_as_16_bit():
    arr = np.full((32, 32), 40000, dtype=np.int32)
    arr[:16] = 1000
    out = pixels(decode(encode(Image.fromarray(arr, "I"), "TIFF")))
    assert np.allclose(out[:16], 1000 * 255 / 65535, atol=1)
    assert np.allclose(out[16:], 40000 * 255 / 65535, atol=1)


def test_integer_image_within_8_bit_range_is_not_darkened():
    arr = np.full((32, 32), 200, dtype=np.int32)
    arr[:16] = 20
    out = pixels(decode(encode(Image.fromarray(arr, "I"), "TIFF")))
    assert (out[:16] == 20).all() and (out[16:] == 200).all()


def test_float_tiff_in_unit_range():
    arr = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (32, 1))
    data = encode(Image.fromarray(arr, "F"), "TIFF")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "F"
    out = pixels(decode(data))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert np.abs(out[0, :, 0] - arr[0] * 255).max() <= 1.0


def test_float_tiff_with_nan_and_large_values():
    arr = np.full((32, 32), 128.0, dtype=np.float32)
    arr[0, 0] = np.nan
    arr[1, 1] = 1e9
    out = pixels(decode(encode(Image.fromarray(arr, "F"), "TIFF")))
    assert out[5, 5, 0] == 128 and out[0, 0, 0] == 0 and out[1, 1, 0] == 255


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    assert (pixels(decode(data)) == (255, 0, 0)).all()


def test_multi_page_tiff_first_page():
    pages = [Image.new("RGB", (40, 30), (0, 200, 0)), Image.new("RGB", (80, 60), (9, 9, 9))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2
    image = decode(data)
    assert image.size == (40, 30)
    assert (pixels(image) == (0, 200, 0)).all()


def test_webp_lossless_and_lossy(car_rgb):
    flat = Image.new("RGB", (32, 32), (12, 34, 56))
    assert (pixels(decode(encode(flat, "WEBP", lossless=True))) == (12, 34, 56)).all()
    lossy = decode(encode(car_rgb, "WEBP", quality=90))
    assert lossy.size == car_rgb.size
    assert np.abs(pixels(lossy) - pixels(car_rgb)).mean() < 8


def test_webp_with_alpha_is_white_where_transparent():
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 16, 32, 32))
    out = pixels(decode(encode(img, "WEBP", lossless=True)))
    assert (out[:16] == 255).all() and (out[16:] == (0, 0, 255)).all()


def test_bmp(car_rgb):
    assert np.array_equal(pixels(decode(encode(car_rgb, "BMP"))), pixels(car_rgb))


@pytest.mark.parametrize(("orientation", "size"), [(1, (64, 32)), (3, (64, 32)), (6, (32, 64)), (8, (32, 64))])
def test_exif_orientation_is_applied(orientation, size):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == size
    arr = pixels(out)
    if orientation == 6:  # rotate 90 clockwise for display: the left half goes to the top
        assert np.allclose(arr[4:28].reshape(-1, 3).mean(0), (255, 0, 0), atol=20)
        assert np.allclose(arr[36:60].reshape(-1, 3).mean(0), (0, 0, 255), atol=20)
    if orientation == 8:  # 90 counter-clockwise: the left half goes to the bottom
        assert np.allclose(arr[36:60].reshape(-1, 3).mean(0), (255, 0, 0), atol=20)
    if orientation == 3:  # 180: left and right swap
        assert np.allclose(arr[:, 36:60].reshape(-1, 3).mean(0), (255, 0, 0), atol=20)


def test_exif_rotated_real_photo(car_rgb):
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(encode(car_rgb, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (car_rgb.height, car_rgb.width)


def test_broken_exif_does_not_cost_a_valid_photo(car_rgb):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(encode(car_rgb, "JPEG", quality=90, exif=exif.tobytes()))
    app1 = data.index(b"Exif\x00\x00")
    data[app1 + 6 : app1 + 14] = b"XX\x00\x2a\xff\xff\xff\xff"  # bogus byte order and IFD offset
    out = decode(bytes(data))
    assert out.mode == "RGB" and sorted(out.size) == sorted(car_rgb.size)


# ---------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_seeds(car_images) -> list[bytes]:
    """Valid images to mutate: a real photo as JPEG (as shipped and small), PNG, WebP, GIF, TIFF, BMP."""
    paths = list(car_images.values())
    with Image.open(paths[1]) as img:
        small = img.convert("RGB").resize((48, 32))
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    return [
        paths[0].read_bytes(),
        encode(small, "JPEG", quality=80),
        encode(small, "JPEG", quality=80, progressive=True),
        encode(small, "PNG"),
        encode(rgba, "PNG"),
        encode(small.convert("P"), "PNG", transparency=3),
        encode(small, "WEBP", quality=70),
        encode(small.convert("P"), "GIF"),
        encode(small, "TIFF", compression="tiff_deflate"),
        encode(small, "BMP"),
    ]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        # Headers are where parsers are fragile: half the edits land in the first 300 bytes.
        end = max(len(data) - 1, 0)
        pos = draw(st.one_of(st.integers(0, min(end, 300)), st.integers(0, end)))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip":
            if data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            if data:
                data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repo; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_every_outcome_is_rgb_or_input_error(fuzz_seeds, data):
    payload = data.draw(st.one_of(st.binary(max_size=2048), mutated(fuzz_seeds)), label="payload")
    try:
        request = read_request({"body": payload}, LIMITS, MAX_TOPK)
        image, topk = request.image, request.options.topk
    except InputError as err:
        event(f"InputError {err.status}")  # outcome mix: pytest --hypothesis-show-statistics
        assert err.status in ERROR_STATUSES, (err.status, err.message)
        assert isinstance(err.message, str) and err.message
        return
    event("RGB image")
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert min(image.size) >= LIMITS.min_side
    assert image.width * image.height <= LIMITS.max_pixels
    assert topk is None
    np.asarray(image)  # the pixels are really there


# ---------------------------------------------------------------------------- Content-Type vs body


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("application/json", 400), ("application/json; charset=utf-8", 400), ("text/plain", 415), ("TEXT/HTML", 415)],
)
def test_binary_body_claiming_json_or_text_is_refused(photo, content_type, status):
    """TorchServe hands over the raw bytes when its JSON/UTF-8 decoding fails; the client sent the wrong type."""
    with pytest.raises(InputError) as info:
        read_request({"body": photo}, LIMITS, MAX_TOPK, {"body": content_type})
    assert info.value.status == status and content_type.split(";")[0].lower() in info.value.message


@pytest.mark.parametrize("content_type", [None, "", "application/octet-stream", "image/jpeg", "image/png"])
def test_binary_body_with_a_binary_content_type_is_read(photo, content_type):
    image = read_request({"body": photo}, LIMITS, MAX_TOPK, {"body": content_type}).image
    assert image.mode == "RGB"


def test_multipart_part_content_type_is_the_one_checked(photo):
    image = read_request(
        {"data": photo, "topk": b"3"}, LIMITS, MAX_TOPK, {"data": "image/jpeg", "topk": "text/plain"}
    ).image
    assert image.mode == "RGB"


# ---------------------------------------------------------------------------- phones: HEIC, AVIF, big photos


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_like_the_jpeg(car_rgb, fmt):
    out = decode(encode(car_rgb, fmt, quality=90))
    assert out.mode == "RGB" and out.size == car_rgb.size
    assert np.abs(pixels(out).astype(int) - pixels(car_rgb).astype(int)).mean() < 6  # lossy, but the same photo


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_exif_orientation_is_applied(car_rgb, fmt):
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(encode(car_rgb, fmt, quality=90, exif=exif.tobytes()))
    assert out.size == (car_rgb.height, car_rgb.width)


def phone_photo(car_rgb, size=(4032, 3024)) -> Image.Image:
    return car_rgb.resize(size, Image.Resampling.BICUBIC)


@pytest.mark.parametrize(
    ("size", "decode_side", "decoded"),
    [
        ((4032, 3024), 336, (504, 378)),  # 1/8 DCT scale: the shipped model's need, a 12-megapixel photo
        ((1600, 1200), 336, (800, 600)),  # 1/4 would leave 300 < 336
        ((4032, 3024), 224, (504, 378)),  # a crop classifier: 1/8 still keeps 224
        ((4032, 3024), 0, (4032, 3024)),  # 0: full size
        ((300, 200), 336, (300, 200)),  # small photos as they are
    ],
)
def test_jpeg_decodes_at_the_smallest_scale_the_model_needs(car_rgb, size, decode_side, decoded):
    data = encode(phone_photo(car_rgb, size), "JPEG", quality=90)
    out = read_request({"body": data}, LIMITS, MAX_TOPK, decode_side=decode_side).image
    assert out.size == decoded and out.mode == "RGB"
    assert uploaded_size(out) == size  # boxes are answered in the upload's pixels


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "HEIF"])
def test_other_formats_are_reduced_to_what_the_model_needs(car_rgb, fmt):
    data = encode(phone_photo(car_rgb, (2000, 1500)), fmt)
    out = read_request({"body": data}, LIMITS, MAX_TOPK, decode_side=336).image
    assert out.size == (500, 375)  # reduced by 4, the largest factor that keeps 336 on the shorter side


def test_a_rotated_phone_photo_is_shrunk_and_upright(car_rgb):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(phone_photo(car_rgb), "JPEG", quality=90, exif=exif.tobytes())
    out = read_request({"body": data}, LIMITS, MAX_TOPK, decode_side=336).image
    assert out.size == (378, 504) and uploaded_size(out) == (3024, 4032)


def test_shrunk_decode_shows_the_same_picture(car_rgb):
    """DCT scaling + the eval preset's resize give nearly the pixels of a full decode + the same resize."""
    data = encode(phone_photo(car_rgb), "JPEG", quality=90)
    fast = read_request({"body": data}, LIMITS, MAX_TOPK, decode_side=336).image.resize((224, 224))
    full = read_request({"body": data}, LIMITS, MAX_TOPK).image.resize(
        (224, 224), Image.Resampling.BILINEAR, reducing_gap=None
    )
    assert np.abs(pixels(fast).astype(int) - pixels(full).astype(int)).mean() < 4


def test_phone_sized_uploads_fit_the_limits():
    """A 48-megapixel photo passes the pixel guard; a 12-megapixel PNG (15-25 MB) the byte limit."""
    assert LIMITS.max_pixels >= 8064 * 6048 and ImageLimits().max_bytes >= 25 * 10**6


@pytest.mark.parametrize("field", ["image", "data", "body"])
def test_base64_as_bytes_in_a_form_field_or_body_is_the_image(photo, field):
    """requests.post(url, data={"image": b64}) sends the base64 text form-encoded: the field arrives as bytes."""
    text = base64.b64encode(photo)
    assert parse_request({field: text}, LIMITS, MAX_TOPK).image_bytes == photo
    data_url = b"data:image/jpeg;base64," + text
    assert parse_request({field: data_url}, LIMITS, MAX_TOPK).image_bytes == photo


def test_text_that_is_not_base64_of_anything_stays_not_an_image():
    assert status_of({"body": b"hello world this is text"}) == 415


def test_decode_cost_counts_the_pixels_a_decode_produces(photo):
    """A JPEG pays for its DCT-scaled size, a PNG for all of its pixels: the handler's batch budget reads this."""
    big = Image.new("RGB", (4032, 3024), (90, 120, 150))
    jpeg, png = open_upload(encode(big, "JPEG"), LIMITS), open_upload(encode(big, "PNG"), LIMITS)
    assert decode_cost(jpeg, 336) == 4032 * 3024 // 64 and decode_cost(png, 336) == 4032 * 3024
    assert decode_cost(jpeg, 0) == 4032 * 3024
