"""draw-box (client/draw_box.py) against a real TorchServe (the session `server` fixture): the
shipped model's box and top-1 label drawn onto a real whole photo."""

from __future__ import annotations

import json

import numpy as np
import pillow_heif
from helpers import command, run
from PIL import Image

from carmodel.errors import EXIT_UNREACHABLE, EXIT_USAGE
from client.draw_box import BOX_COLOUR, MIN_DISPLAY_SIDE, draw

MODEL = "efficientnet_lite0_cars"


def draw_box(server_url: str, image, out, *extra):
    return run([command("draw-box"), str(image), "--model", MODEL, "--url", server_url, "--out", str(out), *extra])


def test_draws_the_box_and_label_onto_a_whole_photo(server, car_image, cars_root, tmp_path):
    photo = cars_root / "photos" / car_image.parent.name / car_image.name
    out = tmp_path / "box.png"
    result = draw_box(server.url("inference"), photo, out, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(out.with_suffix(".json").read_text())
    assert answer["predictions"][0]["class_name"] in result.stdout and answer["make"]["name"] in result.stdout
    x1, y1, x2, y2 = answer["car"]["box"]
    with Image.open(photo) as original, Image.open(out) as png:
        assert png.format == "PNG"
        scale = png.width / original.width  # a 128x96 thumbnail is scaled up to be read
        assert max(png.size) == MIN_DISPLAY_SIDE and png.height == round(original.height * scale)
        pixels = np.asarray(png.convert("RGB"))
    # the box's edges are drawn in the box colour where the server put them
    left, bottom = round(x1 * scale), round(y2 * scale) - 1
    edge = pixels[round((y1 + y2) / 2 * scale), left : left + 2]
    assert (edge == BOX_COLOUR).all(axis=1).any(), edge
    assert (pixels[bottom - 1 : bottom + 1, round((x1 + x2) / 2 * scale)] == BOX_COLOUR).all(axis=1).any()


def test_draws_onto_an_iphone_heic(server, car_image, cars_root, tmp_path):
    photo = cars_root / "photos" / car_image.parent.name / car_image.name
    heic = tmp_path / "photo.heic"
    pillow_heif.from_pillow(Image.open(photo).convert("RGB")).save(heic, quality=90)
    result = draw_box(server.url("inference"), heic, tmp_path / "heic.png")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "heic.png").size == (MIN_DISPLAY_SIDE, MIN_DISPLAY_SIDE * 96 // 128)


def test_drawing_needs_no_server_and_works_without_a_box():
    image = Image.new("RGB", (2000, 1500), (90, 90, 90))
    with_box = draw(image, [([500, 400, 1500, 1100], "Some Car 2012  88%")])
    assert max(with_box.size) == 1024  # large photos are shown smaller
    without = draw(image, [(None, "Some Car 2012  88%")])
    assert (np.asarray(without)[0:5, 0:5] == BOX_COLOUR).all()  # the label sits at the top left


def test_every_car_gets_its_box():
    image = Image.new("RGB", (1000, 500), (90, 90, 90))
    boxes = [[100, 300, 400, 450], [600, 250, 900, 480]]
    pixels = np.asarray(draw(image, [(box, f"Car {i}") for i, box in enumerate(boxes)]))
    scale = pixels.shape[1] / image.width
    for x1, y1, _, y2 in boxes:  # each box's left edge, half way down, is in the box colour
        assert (pixels[round((y1 + y2) / 2 * scale), round(x1 * scale) : round(x1 * scale) + 2] == BOX_COLOUR).all()


def test_missing_image_and_unreachable_server_exit_as_documented(car_image, tmp_path):
    assert draw_box("http://127.0.0.1:9", tmp_path / "nope.jpg", tmp_path / "x.png").returncode == EXIT_USAGE
    result = draw_box("http://127.0.0.1:9", car_image, tmp_path / "x.png", "--timeout", "5")
    assert result.returncode == EXIT_UNREACHABLE, result.stderr
