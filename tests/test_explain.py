"""explain (client/explain.py) against a real TorchServe (the session `server` fixture) and real car photos.

The shipped export may be a provisional one, so no test asserts which class a photo gets.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run
from PIL import Image

from carmodel.errors import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE
from client.explain import place_in_region, render_overlay
from client.photos import ClientError

MODEL = "efficientnet_lite0_cars"
EXPLAIN = str(Path(sys.executable).parent / "explain")  # the entry point users run


@pytest.fixture(scope="module")
def served_eval_size(model_store) -> int:
    """The eval size of the archive the server loaded, not of models/ which may be re-exported meanwhile."""
    with zipfile.ZipFile(model_store / f"{MODEL}_v1.0.mar") as mar:
        return int(yaml.safe_load(mar.read("model.yaml"))["eval_size"])


def explain_cli(server, image, out, *extra):
    return run([EXPLAIN, str(image), "--model", MODEL, "--url", server.url("inference"), "--out", str(out), *extra])


def test_cli_writes_overlay_png_and_normalised_heatmap(server, car_image, served_eval_size, tmp_path):
    out = tmp_path / "heat.png"
    result = explain_cli(server, car_image, out, "--json")
    assert result.returncode == 0, result.stderr
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.width >= 400 and png.height >= 200

    explanation = json.loads(out.with_suffix(".json").read_text())
    heatmap = np.asarray(explanation["heatmap"], dtype=np.float64)
    assert heatmap.shape == (served_eval_size, served_eval_size)
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.max() == pytest.approx(1.0)
    assert isinstance(explanation["class_name"], str) and explanation["class_name"]
    assert 0.0 <= explanation["probability"] <= 1.0


def test_a_whole_photo_is_explained_in_the_region_that_was_classified(server, car_image, cars_root, tmp_path):
    """The shipped model localises: it classified the car cut from the photo, so the heat map
    comes with that region, inside the photo, and the drawing puts it there."""
    photo = cars_root / "photos" / car_image.parent.name / car_image.name
    out = tmp_path / "whole.png"
    result = explain_cli(server, photo, out, "--json")
    assert result.returncode == 0, result.stderr
    x1, y1, x2, y2 = json.loads(out.with_suffix(".json").read_text())["region"]
    width, height = Image.open(photo).size
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert (x2 - x1) * (y2 - y1) < width * height  # the car, not the whole photo


def test_a_heat_map_is_placed_in_its_region_and_nothing_outside():
    full = place_in_region(np.ones((8, 8), dtype=np.float32), [10, 5, 30, 25], (40, 30))
    assert full.shape == (30, 40)
    assert full[5:25, 10:30].min() == pytest.approx(1.0) and full.sum() == pytest.approx(400)
    with pytest.raises(ClientError, match="not inside"):
        place_in_region(np.ones((8, 8)), [10, 5, 50, 25], (40, 30))


def test_cli_without_json_flag_writes_only_the_png(server, car_image, tmp_path):
    out = tmp_path / "only.png"
    result = explain_cli(server, car_image, out)
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert not out.with_suffix(".json").exists()


def test_target_class_is_explained(server, car_image, tmp_path):
    out = tmp_path / "target.png"
    result = explain_cli(server, car_image, out, "--target", "3", "--json")
    assert result.returncode == 0, result.stderr
    explanation = json.loads(out.with_suffix(".json").read_text())
    assert explanation["class_id"] == 3
    assert out.is_file()


def test_corrupt_image_reports_the_servers_message(server, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    out = tmp_path / "corrupt.png"
    result = explain_cli(server, corrupt, out)
    assert result.returncode == EXIT_SERVER == 4
    assert result.stderr.startswith("error: ")
    assert "415" in result.stderr and "not an image in a supported format" in result.stderr
    assert not out.exists()


def test_missing_image_is_a_local_error(server, tmp_path):
    result = explain_cli(server, tmp_path / "nope.jpg", tmp_path / "nope.png")
    assert result.returncode == EXIT_USAGE == 2
    assert "error: image not found" in result.stderr


def test_unreachable_server(car_image, tmp_path):
    with socket.socket() as s:  # a port nothing listens on once this block closes it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "x.png"
    result = run([EXPLAIN, str(car_image), "--model", MODEL, "--url", url, "--out", str(out), "--timeout", "5"])
    assert result.returncode == EXIT_UNREACHABLE == 3
    # The same words as predict-dir and versions: one client (serving/client.py) says it.
    assert result.stderr.strip() == f"error: TorchServe not reachable at {url}"
    assert not out.exists()


def test_render_overlay_needs_no_server(tmp_path):
    # Wide like a car crop, and a heat map of another size: the function must stretch it.
    x = np.linspace(0, 255, 300, dtype=np.float32)
    image = Image.fromarray(np.stack([np.tile(x, (150, 1))] * 3, axis=-1).astype(np.uint8))
    yy, xx = np.mgrid[0:64, 0:64]
    heatmap = np.exp(-((xx - 40) ** 2 + (yy - 20) ** 2) / 100.0)

    out = render_overlay(image, heatmap, "synthetic (class 0), p = 50.0%", tmp_path / "sub" / "synthetic.png", 0.6)
    flat = render_overlay(image, np.zeros_like(heatmap), "synthetic (class 0), p = 50.0%", tmp_path / "flat.png", 0.6)

    assert out == tmp_path / "sub" / "synthetic.png"
    with Image.open(out) as png, Image.open(flat) as flat_png:
        assert png.format == "PNG"
        assert png.size == flat_png.size and png.width > png.height  # two wide panels side by side
        pixels, flat_pixels = (np.asarray(p.convert("RGB"), dtype=np.int16) for p in (png, flat_png))
    # The heat map is drawn: where the blob is, the picture differs from one with no attribution.
    assert np.abs(pixels - flat_pixels).max() > 60
