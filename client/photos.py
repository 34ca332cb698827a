"""The local side of the drawing clients (explain, draw-box): read the photo, show it as the
handler saw it, and fail with an exit status that says whose problem it is."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from carmodel.errors import EXIT_USAGE, StatusError, exit_with
from carmodel.images import ImageLimits, InputError, decode_image

# Drawings are for people: capping the photo keeps 24-megapixel uploads from costing seconds and
# hundreds of MB for no visible gain.
MAX_DISPLAY_SIDE = 1024


class ClientError(StatusError):
    """A failure of a client's own (a local file, an answer it cannot use), with its exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(None, message, exit_code)


def read_image_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ClientError(f"image not found: {path}", EXIT_USAGE)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ClientError(f"cannot read {path}: {err.strerror or err}", EXIT_USAGE) from None


def load_display_image(data: bytes, name: str) -> Image.Image:
    """The photo as the handler decodes it (carmodel.images: the same formats, EXIF orientation, RGB),
    at its full size: the server's boxes are in its pixels."""
    try:
        return decode_image(data, ImageLimits())
    except InputError as err:
        raise ClientError(f"cannot decode {name} locally for drawing: {err.message}", EXIT_USAGE) from None


def fit_for_display(image: Image.Image, max_side: int = MAX_DISPLAY_SIDE) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )


def save_answer(out_path: Path, answer) -> Path:
    """The server's answer as JSON beside the drawing (`--json`)."""
    json_path = out_path.with_suffix(".json")
    json_path.write_text(json.dumps(answer))
    print(f"wrote {json_path}")
    return json_path


def exit_status(work: Callable[[], object]) -> int:
    """Run a drawing client's work; its failures become the documented exit statuses."""
    try:
        work()
    except (StatusError, OSError) as err:  # OSError: writing the PNG/JSON, the user's to fix (EXIT_USAGE)
        return exit_with(err)
    return 0
