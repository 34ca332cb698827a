"""predict-dir (client/predict_dir.py) against a real TorchServe (the session `server`) with real car photos."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from helpers import DEFAULT_EXPORT, python, run
from PIL import Image

from client.predict_dir import main
from serving.client import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE
from serving.torchserve import free_ports

MODEL = "efficientnet_lite0_cars"
PREDICT_DIR = str(Path(sys.executable).parent / "predict-dir")  # the entry point users run


@pytest.fixture
def image_tree(tmp_path, car_images) -> Path:
    """Real photos at the top, in a nested folder, with an upper-case extension and as an iPhone's HEIC;
    a corrupt one; a text file."""
    root = tmp_path / "photos"
    nested = root / "lot" / "row 2"
    nested.mkdir(parents=True)
    sources = list(car_images.values())[:5]
    shutil.copy(sources[0], root / "car_a.jpg")
    shutil.copy(sources[1], root / "car_b.jpeg")
    shutil.copy(sources[2], nested / "car_c.jpg")
    shutil.copy(sources[3], root / "CAR_D.JPG")
    Image.open(sources[4]).convert("RGB").save(root / "IMG_0001.HEIC", "HEIF", quality=90)
    (root / "broken.jpg").write_bytes(random.Random(0).randbytes(4096))
    (root / "notes.txt").write_text("not a photo\n")
    return root


def test_directory_is_classified_and_saved(server, image_tree, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            str(image_tree),
            "--model",
            MODEL,
            "--url",
            server.url("inference"),
            "--out",
            str(out),
            "--csv",
            "--concurrency",
            "4",
            "--topk",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1, captured.err  # exactly the broken file failed

    printed = json.loads(captured.out)
    saved_json = sorted(out.glob("predictions_*.json"))
    saved_csv = sorted(out.glob("predictions_*.csv"))
    assert len(saved_json) == 1 and len(saved_csv) == 1
    assert json.loads(saved_json[0].read_text()) == printed
    assert str(saved_json[0]) in captured.err and str(saved_csv[0]) in captured.err

    expected = {"car_a.jpg", "car_b.jpeg", "CAR_D.JPG", "IMG_0001.HEIC", "lot/row 2/car_c.jpg", "broken.jpg"}
    assert set(printed["predictions"]) == expected
    assert printed["counts"] == {"ok": 5, "error": 1}
    assert printed["model"] == MODEL and printed["url"] == server.url("inference")
    assert printed["images_per_second"] > 0

    broken = printed["predictions"]["broken.jpg"]
    assert 400 <= broken["status"] < 500 and broken["error"]
    class_names = set(json.loads((DEFAULT_EXPORT / "index_to_name.json").read_text()).values())
    for name in expected - {"broken.jpg"}:
        result = printed["predictions"][name]
        assert "error" not in result, result
        assert result["class_name"] in class_names
        assert len(result["top_k"]) == 3
        assert result["top_k"][0]["class_name"] == result["class_name"]
        assert 0 <= result["probability"] <= 1

    rows = {row["file"]: row for row in csv.DictReader(saved_csv[0].open())}
    assert set(rows) == expected
    assert rows["broken.jpg"]["error"] and not rows["broken.jpg"]["class_name"]
    assert rows["car_a.jpg"]["class_name"] == printed["predictions"]["car_a.jpg"]["class_name"]


def test_unreachable_server_exits_3(image_tree, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_ports()['inference']}"  # nothing listens there
    code = main([str(image_tree), "--model", MODEL, "--url", url, "--out", str(tmp_path / "out"), "--quiet"])
    assert code == EXIT_UNREACHABLE == 3
    assert f"error: TorchServe not reachable at {url}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, version", [("no_such_model", None), (MODEL, "99.0")])
def test_unregistered_model_or_version_exits_4(server, image_tree, tmp_path, capsys, model, version):
    args = [str(image_tree), "--model", model, "--url", server.url("inference"), "--out", str(tmp_path / "out")]
    code = main(args + (["--version", version] if version else []))
    err = capsys.readouterr().err
    assert code == EXIT_SERVER == 4, err
    assert f"error: model {model}" in err and "not found on the server" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", [MODEL, "no_such_model"])
def test_management_check_before_any_image(server, image_tree, tmp_path, capsys, model):
    """--management_url asks the management API for the model first (the README's optional check)."""
    args = [str(image_tree), "--model", model, "--url", server.url("inference"), "--out", str(tmp_path / "out")]
    code = main([*args, "--management_url", server.url("management"), "--quiet"])
    err = capsys.readouterr().err
    if model == MODEL:
        assert code == 1, err  # the broken file, as without the check
    else:
        assert code == EXIT_SERVER, err
        assert f"error: model {model} not found on the server" in err
        assert not (tmp_path / "out").exists()


def test_missing_or_empty_directory_exits_2(tmp_path):
    result = run([PREDICT_DIR, str(tmp_path / "nope"), "--model", MODEL, "--url", "http://127.0.0.1:9"])
    assert result.returncode == EXIT_USAGE == 2 and "error: not a directory" in result.stderr

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no photos here")
    assert main([str(tmp_path / "empty"), "--model", MODEL]) == 2


def test_the_client_does_not_import_torch():
    """predict-dir starts in well under a second: no torch, not even through carmodel's suffix list."""
    probe = "import sys, client.predict_dir, client.explain, client.versions; print(sorted(sys.modules))"
    result = python("-c", probe)
    assert result.returncode == 0, result.stderr
    modules = set(result.stdout.strip().strip("[]").replace("'", "").split(", "))
    assert "client.predict_dir" in modules
    assert not {m for m in modules if m == "torch" or m.startswith(("torch.", "torchvision"))}
