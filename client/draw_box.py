"""Ask TorchServe where the cars are and what they are, and draw them onto the photo as a PNG.

    draw-box car.jpg --model efficientnet_lite0_cars
    draw-box car.jpg --model efficientnet_lite0_cars --out car_box.png --json

The photo goes to ``{url}/predictions/{model}`` with ``X-Details: true``; a model with a car
detector answers every car it found (``cars``, the most prominent first) with its box in the photo's
pixels. The PNG is the photo (EXIF orientation applied, as the handler sees it) with each car's box
and its label written above it: the top-1 class and its probability, then the make and its
probability ("not sure" when the model is not). A model with only a box head answers one box; one
without answers none: the label is drawn across the top of the photo instead; so is "No car found"
for a photo without a car.

Exit status: 0 done; 2 bad local input; 3 TorchServe not reachable (or refused the token);
4 TorchServe answered with an error (or with an answer of another shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from carmodel.errors import EXIT_SERVER
from client import add_server_arguments, server_client
from client.photos import ClientError, exit_status, fit_for_display, load_display_image, read_image_bytes, save_answer

BOX_COLOUR = (255, 208, 0)  # amber: visible on road grey, sky and most paint
LABEL_TEXT = (0, 0, 0)
MIN_DISPLAY_SIDE = 512  # a web thumbnail is scaled up, so that the label is readable on it


def parse_answer(body) -> dict:
    """The detailed answer, checked for what is drawn."""
    car = body.get("car") if isinstance(body, dict) else None
    if not isinstance(car, dict) or not isinstance(body.get("predictions"), list):
        raise ClientError(f"server answer is not a detailed answer: {str(body)[:200]}", EXIT_SERVER)
    if car.get("found") and not body["predictions"]:
        raise ClientError(f"server answer has no predictions: {str(body)[:200]}", EXIT_SERVER)
    for box in [car.get("box"), *(c.get("box") for c in body.get("cars") or [])]:
        if box is not None and (not isinstance(box, list) or len(box) != 4):
            raise ClientError(f"server answer's box is not [x1, y1, x2, y2]: {box!r}", EXIT_SERVER)
    return body


def cars(answer: dict) -> list[dict]:
    """Every car of the answer, most prominent first, each with its box (None: the model gives none)."""
    if "cars" in answer:
        return answer["cars"]
    return [{**answer, "box": answer["car"]["box"]}] if answer["car"]["found"] else []


def label(answer: dict) -> str:
    """What a person reads on the photo for one car (the answer itself, or one of its `cars`)."""
    if "car" in answer and not answer["car"]["found"]:
        return "No car found"
    top1 = answer["predictions"][0]
    text = f"{top1['class_name']}  {top1['probability']:.0%}"
    make = answer.get("make")
    if make:
        text += f"  ({make['name']} {make['probability']:.0%})"
    return text + ("  - not sure" if answer.get("uncertain") else "")


def draw(image: Image.Image, labelled: list[tuple[list[float] | None, str]]) -> Image.Image:
    """The photo, scaled for display, with each (box in the photo's pixels or None, text) drawn on."""
    shown = fit_for_display(image)
    if max(shown.size) < MIN_DISPLAY_SIDE:
        factor = MIN_DISPLAY_SIDE / max(shown.size)
        shown = shown.resize((round(shown.width * factor), round(shown.height * factor)), Image.Resampling.LANCZOS)
    shown = shown.copy()
    scale = shown.width / image.width
    canvas = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=max(12, min(shown.size) // 20))
    line = max(1, round(min(shown.size) / 100))
    for box, text in reversed(labelled):  # the most prominent car's label drawn last, on top
        draw_one(canvas, box, text, scale, font, line, shown.size)
    return shown


def draw_one(canvas: ImageDraw.ImageDraw, box, text: str, scale: float, font, line: int, size) -> None:
    if box is not None:
        x1, y1, x2, y2 = (round(v * scale) for v in box)
        canvas.rectangle((x1, y1, x2 - 1, y2 - 1), outline=BOX_COLOUR, width=line)
        anchor = (x1, y1)
    else:
        anchor = (0, 0)
    left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
    width, height = right - left + 2 * line, bottom - top + 2 * line
    # above the box where there is room, else inside its top edge; never off the photo
    x = min(max(anchor[0], 0), max(size[0] - width, 0))
    y = anchor[1] - height if anchor[1] - height >= 0 else anchor[1]
    canvas.rectangle((x, y, x + width, y + height), fill=BOX_COLOUR)
    canvas.text((x + line - left, y + line - top), text, fill=LABEL_TEXT, font=font)


def default_out_path(image_path: Path) -> Path:
    return Path.cwd() / f"{image_path.stem}_box.png"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path, help="a photo of a car (JPEG, PNG, WebP, ...)")
    parser.add_argument("--model", required=True, help="model name registered in TorchServe")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <image stem>_box.png here)")
    parser.add_argument("--json", action="store_true", help="also write the server's answer next to the PNG")
    add_server_arguments(parser)
    return parser.parse_args(argv)


def draw_box(args: argparse.Namespace) -> Path:
    data = read_image_bytes(args.image)
    image = load_display_image(data, str(args.image))
    with server_client(args) as client:
        answer = parse_answer(client.details(args.model, data))
    out_path = args.out or default_out_path(args.image)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    found = cars(answer)
    labelled = [(car["box"], label(car)) for car in found] or [(None, label(answer))]
    draw(image, labelled).save(out_path, format="PNG")
    for box, text in labelled:
        print(text + (f" at {box}" if box else ""))
    print(f"{len(found)} car(s): wrote {out_path}")
    if args.json:
        save_answer(out_path, answer)
    return out_path


def main(argv=None) -> int:
    args = parse_args(argv)  # argparse itself exits 2 (EXIT_USAGE) on bad flags
    return exit_status(lambda: draw_box(args))


if __name__ == "__main__":
    sys.exit(main())
