"""Turn one TorchServe request row into image bytes and its options (top-k, whether to answer with
the car's box or in detail), or an `InputError` that says why not.

Pure functions with no TorchServe imports, so they are tested and fuzzed in-process
(tests/test_inputs.py). Decoding the bytes is carmodel.images'; the statuses added here:

    400 malformed request (bad base64, bad JSON, no image field, bad topk, box or details)
    415 a binary body that claims to be text

A request row is what TorchServe's Python worker hands the handler: a dict of parameter name
to value, where the value is bytes (raw body, multipart file, query parameter), str (a text
body) or an already-parsed JSON body (dict).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from carmodel.images import ImageLimits, InputError

# Where TorchServe puts the image: "body" for a raw body (curl -T / --data-binary), "data" for
# the stock clients' multipart field; "file"/"image" are the names people reach for in forms.
IMAGE_FIELDS = ("data", "body", "file", "image")
JSON_IMAGE_FIELDS = ("image", "data", "b64", "image_b64")
# Base64 text (or a data: URL) arriving as bytes: a form field (`requests.post(url, data={"image": b64})`)
# or a text body. No image format's bytes are all of this alphabet (JPEG starts 0xFF, PNG 0x89).
BASE64_TEXT = re.compile(rb"(data:[\w/+.-]+;base64,)?[A-Za-z0-9+/=\s]+")


@dataclass
class Options:
    """How a request wants its answer."""

    topk: int | None = None
    box: bool | None = None  # answer {"predictions": [...], "box": [x1, y1, x2, y2]} instead of the list
    details: bool | None = None  # answer the detailed shape: car, make, body type, uncertain, predictions


@dataclass
class ParsedRequest:
    image_bytes: bytes
    options: Options


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def parse_topk(value, max_topk: int) -> int | None:
    if value is None:
        return None
    text = _text(value).strip()
    try:
        topk = int(text)
    except ValueError:
        raise InputError(400, f"topk must be an integer, got {text[:20]!r}") from None
    if not 1 <= topk <= max_topk:
        raise InputError(400, f"topk must be between 1 and {max_topk}, got {topk}")
    return topk


def parse_flag(name: str, value) -> bool | None:
    if value is None:
        return None
    text = _text(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InputError(400, f"{name} must be true or false, got {text[:20]!r}")


def decode_base64(text: str, limits: ImageLimits) -> bytes:
    if "," in text[:100] and text.lstrip().startswith("data:"):
        text = text.split(",", 1)[1]  # a data: URL, as browsers produce
    if len(text) > limits.max_bytes * 4 // 3 + 4:
        raise InputError(413, f"base64 image is larger than the {limits.max_bytes} byte limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "image field is not valid base64") from None


def base64_image(data: bytes, limits: ImageLimits) -> bytes | None:
    """The image in `data` when `data` is valid base64 text; None when it is not (it may be a binary image)."""
    if not BASE64_TEXT.fullmatch(data):
        return None
    try:
        return decode_base64(data.decode("ascii"), limits)
    except InputError as err:
        if err.status == 413:
            raise
        return None


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


def parse_options(fields: dict, max_topk: int, given: Options | None = None) -> Options:
    """topk, box and details from a request's fields; what `given` already holds wins."""
    given = given or Options()
    return Options(
        topk=given.topk if given.topk is not None else parse_topk(fields.get("topk"), max_topk),
        box=given.box if given.box is not None else parse_flag("box", fields.get("box")),
        details=given.details if given.details is not None else parse_flag("details", fields.get("details")),
    )


def parse_request(
    row: dict, limits: ImageLimits, max_topk: int, content_types: dict[str, str] | None = None
) -> ParsedRequest:
    """`content_types`: the Content-Type TorchServe recorded for each field (the body's or a multipart part's)."""
    if not isinstance(row, dict):
        raise InputError(400, "unexpected request format")
    options = parse_options(row, max_topk)
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
        return ParsedRequest(decode_base64(value[key], limits), parse_options(value, max_topk, options))
    if isinstance(value, str):  # a text body: base64, as the stock handler accepts
        return ParsedRequest(decode_base64(value, limits), options)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        if data[:1] in (b"{", b"["):
            raise InputError(400, "body looks like JSON but is not valid JSON with an 'image' field")
        image = base64_image(data, limits)
        if image is not None:
            return ParsedRequest(image, options)
        check_binary_content_type((content_types or {}).get(field))
        return ParsedRequest(data, options)
    if isinstance(value, list):
        raise InputError(400, "JSON body must be an object with a base64 'image' field, not a list")
    raise InputError(400, f"unsupported request value of type {type(value).__name__}")


# ------------------------------------------------------------------ a TorchServe request's parts

# TorchServe 0.12 does not pass query strings to handlers: these headers stand in for the fields.
OPTION_HEADERS = {"x-top-k": "topk", "x-box": "box", "x-details": "details"}


def has_request(context, idx: int) -> bool:
    """Under a KServe envelope one request carries several images: the items past the first have
    no HTTP request of their own (no headers, no status; their errors go in the response body)."""
    return context is not None and idx < len(context.request_processor or [])


def request_headers(context, idx: int) -> dict:
    return (context.get_all_request_header(idx) if has_request(context, idx) else None) or {}


def content_types(headers: dict) -> dict[str, str]:
    """TorchServe files each field's Content-Type under the field's name: {"body": {"content-type": ...}}."""
    return {name: value.get("content-type") for name, value in headers.items() if isinstance(value, dict)}


def http_headers(headers: dict) -> dict[str, str]:
    """The HTTP headers among a request's (every HTTP request has some: Host, Content-Length, ...); a
    gRPC call has none, only each input's content type (a dict, see `content_types`)."""
    return {name: value for name, value in headers.items() if isinstance(value, str)}


def with_header_options(headers: dict, row):
    """`X-Top-K`, `X-Box` and `X-Details` as if they were fields (a field of the request itself wins),
    so they work with curl -T."""
    if not isinstance(row, dict):
        return row
    given = {OPTION_HEADERS[k.lower()]: v for k, v in headers.items() if k.lower() in OPTION_HEADERS}
    return {**given, **row}


def read_row(row, headers: dict, limits: ImageLimits, max_topk: int, default_topk: int) -> ParsedRequest:
    """One TorchServe row and its request's headers -> the image's bytes and its options (top-k
    defaulted), or an InputError."""
    parsed = parse_request(with_header_options(headers, row), limits, max_topk, content_types(headers))
    parsed.options.topk = parsed.options.topk or default_topk
    return parsed


def explain_target(row) -> int | None:
    """The class an explanation asks for (a `target` field), if it names one."""
    raw = row.get("target") if isinstance(row, dict) else None
    try:
        return int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except (TypeError, ValueError):
        return None


def shaped(answer, options: Options):
    """The answer (carmodel.predictor.Answer) in the shape the request asked for. Without asking: the
    plain top-k list, so clients reading it keep working."""
    if options.details:
        return answer.details()
    if options.box:
        boxes = {} if answer.cars is None else {"boxes": [list(car.box) for car in answer.cars]}
        return {"predictions": answer.rows(), "box": answer.box and list(answer.box), **boxes}
    return answer.rows()
