"""predict-dir (client/predict_dir.py) against a real TorchServe (the session `server`) with real car photos."""

from __future__ import annotations

import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import DEFAULT_EXPORT, ROOT, python, run, start_server
from PIL import Image

from carmodel.errors import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE
from carmodel.vehicles import describe
from client.predict_dir import EXIT_INTERRUPTED, main, read_lines
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


def predict_dir(*args: str) -> list[str]:
    return [PREDICT_DIR, *args]


def lines_of(out: Path) -> Path:
    (lines,) = sorted(out.glob("predictions_*.jsonl"))
    return lines


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_directory_is_classified_and_saved(server, image_tree, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(image_tree), "--model", MODEL, "--url", server.url("inference"), "--out", str(out)]
    code = main([*args, "--csv", "--json", "--concurrency", "4", "--topk", "3", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # exactly the broken file failed

    lines = lines_of(out)
    results = read_jsonl(lines)
    expected = {"car_a.jpg", "car_b.jpeg", "CAR_D.JPG", "IMG_0001.HEIC", "lot/row 2/car_c.jpg", "broken.jpg"}
    assert [r["file"] for r in results] == sorted(expected)  # one line per image, sorted by file
    summary = json.loads(lines.with_suffix(".summary.json").read_text())
    counts = summary["counts"]
    assert counts == {"ok": 5, "error": 1, "no_car": 0, "uncertain": counts["uncertain"], "cars": counts["cars"]}
    assert counts["uncertain"] == sum(bool(r.get("uncertain")) for r in results)
    assert counts["cars"] == sum(len(r.get("cars", [])) for r in results) >= 5  # every car of each photo
    for result in results:
        if "cars" in result:  # the most prominent car's fields, and every car with its box
            assert result["cars"][0]["class_id"] == result["class_id"] and len(result["cars"][0]["box"]) == 4
    assert summary["model"] == MODEL and summary["url"] == server.url("inference") and summary["complete"]
    assert summary["engine"] == "server" and summary["images_per_second"] > 0
    for path in (lines, lines.with_suffix(".summary.json"), lines.with_suffix(".csv"), lines.with_suffix(".json")):
        assert f"saved {path}" in captured.err

    by_file = {r["file"]: r for r in results}
    broken = by_file["broken.jpg"]
    assert 400 <= broken["status"] < 500 and broken["error"]
    class_names = set(json.loads((DEFAULT_EXPORT / "index_to_name.json").read_text()).values())
    for name in expected - {"broken.jpg"}:
        result = by_file[name]
        assert "error" not in result, result
        assert result["class_name"] in class_names and result["car_found"] is True
        vehicle = describe(result["class_name"])
        assert (result["make"], result["model"], result["year"], result["body_type"]) == (
            vehicle.make,
            vehicle.model,
            vehicle.year,
            vehicle.body_type,
        )
        assert len(result["top_k"]) == 3 and result["top_k"][0]["class_name"] == result["class_name"]
        assert 0 <= result["probability"] <= 1

    rows = {row["file"]: row for row in csv.DictReader(lines.with_suffix(".csv").open())}
    assert set(rows) == expected
    assert rows["broken.jpg"]["error"] and not rows["broken.jpg"]["class_name"]
    assert rows["car_a.jpg"]["class_name"] == by_file["car_a.jpg"]["class_name"]
    assert rows["car_a.jpg"]["make"] == by_file["car_a.jpg"]["make"] != ""
    whole = json.loads(lines.with_suffix(".json").read_text())
    assert (
        whole["counts"] == summary["counts"]
        and whole["predictions"]["car_a.jpg"]["class_id"] == by_file["car_a.jpg"]["class_id"]
    )


def test_photos_without_a_car_are_counted(server, tmp_path, car_images, no_car_pictures):
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copy(next(iter(car_images.values())), root / "car.jpg")
    for path in no_car_pictures.values():
        shutil.copy(path, root / path.name)
    out = tmp_path / "out"
    code = main([str(root), "--model", MODEL, "--url", server.url("inference"), "--out", str(out), "--quiet"])
    assert code == 0
    summary = json.loads(lines_of(out).with_suffix(".summary.json").read_text())
    rows = read_jsonl(lines_of(out))
    called_cars = {r["file"]: r["car_score"] for r in rows if r.get("car_found")}
    assert summary["counts"]["no_car"] == len(no_car_pictures), called_cars
    assert summary["counts"]["ok"] == len(no_car_pictures) + 1
    assert {r["file"] for r in rows if r["car_found"] is False} == {p.name for p in no_car_pictures.values()}


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


# ---------------------------------------------------------------------------- nothing lost

MANY = 160  # enough photos that a run is still going when it is interrupted


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, cars_root) -> Path:
    """MANY real photos spread over the classes, linked (not copied) as <class>/<file>."""
    root = tmp_path_factory.mktemp("many")
    photos = sorted((cars_root / "train").rglob("*.jpg"))
    for photo in photos[:: len(photos) // MANY][:MANY]:
        (root / photo.parent.name).mkdir(exist_ok=True)
        (root / photo.parent.name / photo.name).symlink_to(photo)
    return root


@pytest.fixture(scope="module")
def clean_run(server, many_photos, tmp_path_factory) -> dict[str, dict]:
    """An uninterrupted run over the photos: what an interrupted and resumed one must end up with."""
    out = tmp_path_factory.mktemp("clean")
    result = run(predict_dir(str(many_photos), "--model", MODEL, "--url", server.url("inference"), "--out", str(out)))
    assert result.returncode == 0, result.stderr[-2000:]
    return {r["file"]: r for r in read_jsonl(lines_of(out))}


def same_answers(results: list[dict], clean: dict[str, dict]) -> None:
    """The same files, each once, with the same answers (probabilities to float noise: batches differ)."""
    assert [r["file"] for r in results] == sorted(clean)
    for result in results:
        expected = clean[result["file"]]
        assert {k: result.get(k) for k in ("car_found", "class_id", "make", "uncertain")} == {
            k: expected.get(k) for k in ("car_found", "class_id", "make", "uncertain")
        }, result["file"]
        assert result.get("probability", 0) == pytest.approx(expected.get("probability", 0), abs=1e-3)


def start_and_stop_half_way(args: list[str], lines: Path, stop) -> int:
    """Run predict-dir, call `stop(process)` once half the photos are answered; its exit status."""
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (lines.is_file() and len(lines.read_text().splitlines()) >= MANY // 2):
        assert process.poll() is None, f"finished before it could be stopped: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    stop(process)
    return process.wait(60)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_run_resumes_to_a_clean_runs_answers(server, many_photos, clean_run, tmp_path, signal_name):
    """Ctrl-C, SIGTERM or kill -9 half way: the lines written are kept, --resume sends only the rest,
    and the finished file equals an uninterrupted run's."""
    lines = tmp_path / "run.jsonl"
    args = predict_dir(str(many_photos), "--model", MODEL, "--url", server.url("inference"), "--quiet")
    code = start_and_stop_half_way(
        [*args, "--resume", str(lines)], lines, lambda p: p.send_signal(getattr(signal, signal_name))
    )
    assert code == (-9 if signal_name == "SIGKILL" else EXIT_INTERRUPTED), code
    kept = read_lines(lines)  # a line cut short by kill -9 is not counted
    assert MANY // 2 <= len(kept) < MANY
    if signal_name != "SIGKILL":
        summary = json.loads(lines.with_suffix(".summary.json").read_text())
        assert summary["complete"] is False and summary["counts"]["ok"] == len(kept)

    result = run([*args, "--resume", str(lines)])
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(lines.with_suffix(".summary.json").read_text())
    assert summary["complete"] and summary["answered"] == MANY - len(kept)  # none of the kept sent again
    same_answers(read_jsonl(lines), clean_run)


@pytest.fixture
def restartable(tmp_path, model_store):
    """A TorchServe of the test's own, to stop and start."""
    srv = start_server(tmp_path / "ts", model_store, {MODEL: f"{MODEL}_v1.0.mar"})
    yield srv
    srv.stop()


@pytest.mark.slow
def test_a_server_restart_mid_run_loses_nothing(restartable, many_photos, clean_run, tmp_path):
    lines = tmp_path / "run.jsonl"
    args = predict_dir(str(many_photos), "--model", MODEL, "--url", restartable.url("inference"), "--quiet")

    def restart(process):
        restartable.stop()
        restartable.start({MODEL: f"{MODEL}_v1.0.mar"}, restore=False)

    assert start_and_stop_half_way([*args, "--resume", str(lines), "--concurrency", "4"], lines, restart) == 0
    summary = json.loads(lines.with_suffix(".summary.json").read_text())
    assert summary["complete"] and summary["counts"]["error"] == 0, summary
    same_answers(read_jsonl(lines), clean_run)


@pytest.mark.slow
def test_the_ray_engine_answers_as_the_server_does(image_tree, server, tmp_path):
    """The export's chain in Ray Data actors on a local Ray (this machine's cores), over the same photos."""
    served, rayed = tmp_path / "served", tmp_path / "ray"
    common = [str(image_tree), "--quiet", "--parquet"]
    assert (
        run(predict_dir(*common, "--model", MODEL, "--url", server.url("inference"), "--out", str(served))).returncode
        == 1
    )
    result = run(
        predict_dir(
            *common, "--engine", "ray", "--export", str(DEFAULT_EXPORT), "--out", str(rayed), "--concurrency", "2"
        )
    )
    assert result.returncode == 1, result.stderr[-3000:]  # the broken photo, refused as the server refuses it
    by_server = read_jsonl(lines_of(served))
    same_answers(read_jsonl(lines_of(rayed)), {r["file"]: r for r in by_server})
    broken = [r for r in read_jsonl(lines_of(rayed)) if "error" in r]
    assert [(r["file"], r["status"]) for r in broken] == [(r["file"], r["status"]) for r in by_server if "error" in r]
    summary = json.loads(lines_of(rayed).with_suffix(".summary.json").read_text())
    assert summary["engine"] == "ray" and summary["model"] == MODEL and summary["address"] == "local"
    import pyarrow.parquet as pq

    assert pq.read_table(lines_of(rayed).with_suffix(".parquet")).num_rows == len(by_server)
