"""The benchmark's own parts that decide what its tables say: the real-world request photos, the
per-photo grouping of the table, and the in-process pipeline doing the handler's work."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DEFAULT_EXPORT
from PIL import Image

from bench import exports, photos, report
from bench.common import MODELS_DIR, Row
from bench.inprocess import Pipeline
from bench.run import DEFAULT_MODELS
from carmodel.export import ExportDir
from carmodel.predictor import Predictor


def test_real_world_photos_are_the_sizes_and_weights_phones_send(car_image, tmp_path):
    made = {kind: photos.real_world_photo(car_image, kind, tmp_path) for kind in photos.KINDS}
    assert made["benchmark"] == car_image
    with Image.open(made["phone"]) as phone, Image.open(made["phone_png"]) as png, Image.open(made["web"]) as web:
        assert (phone.size, phone.format) == ((4032, 3024), "JPEG") and png.format == "PNG"
        assert web.size == (1600, 1200)
    with Image.open(made["four_cars"]) as street:  # four copies of the car, in a row on a grey street
        assert street.size == (1280, 800)
        pixels = np.asarray(street.convert("L"), dtype=np.float32)
        assert pixels[:200].std() < 10 and pixels[-300:].std() > 20  # the sky plain, the cars' row not
    assert 1.5e6 < made["phone"].stat().st_size < 5e6  # a 12-megapixel phone JPEG, noise and all
    assert made["phone_png"].stat().st_size > 12e6
    assert photos.real_world_photo(car_image, "phone", tmp_path) == made["phone"]  # made once
    assert photos.label(made["phone"]).startswith("4032x3024 JPEG")


def row(photo: str, setup: str, level: str, img_s: float) -> Row:
    return Row("m", setup, level, img_s, 1.0, 1.0, 1.0, 0, 10, photo=photo)


def test_table_compares_each_photo_with_its_own_ceiling_and_stock():
    rows = [
        row("big", "inprocess", "batch 8", 40.0),
        row("small", "inprocess", "batch 8", 200.0),
        row("small", "ours", "c=32", 150.0),
        row("big", "ours", "c=32", 30.0),
        row("big", "stock", "c=32", 10.0),
    ]
    lines = report.markdown(rows, 25.0).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[1] for c in cells] == ["big", "big", "big", "small", "small"]  # grouped by photo
    ours_big = next(c for c in cells if c[1] == "big" and c[2] == "ours")
    ours_small = next(c for c in cells if c[1] == "small" and c[2] == "ours")
    assert ours_big[-1] == "75%" and ours_big[-2] == "3.00x"
    assert ours_small[-1] == "75%" and ours_small[-2] == "-"


def test_inprocess_pipeline_answers_as_the_predictor_on_a_phone_photo(car_image, tmp_path):
    phone = photos.real_world_photo(car_image, "phone", tmp_path)
    pipeline = Pipeline(ExportDir(DEFAULT_EXPORT))
    answers = pipeline(phone.read_bytes(), 2)
    full = Predictor.for_export(ExportDir(DEFAULT_EXPORT)).predict([Image.open(phone).convert("RGB")], k=1)
    top1 = [answer.predictions[0].class_id for answer in [*answers, *full]]
    assert len(answers) == 2 and top1[0] == top1[1] == top1[2]


@pytest.mark.parametrize("name", DEFAULT_MODELS)
def test_every_model_make_bench_benchmarks_has_an_export_that_answers(name, car_image, tmp_path):
    """`make bench` on a fresh clone: the shipped export, or random weights in the arch's plain shape."""
    shipped = ExportDir(MODELS_DIR / name)
    if exports.is_complete(shipped):
        export = shipped
    else:
        export = exports.make_random_export(name.removesuffix(exports.NAME_SUFFIX), ExportDir(tmp_path / name))
        assert exports.is_complete(export)
    answer = Predictor.for_export(export, backend="torch").predict([Image.open(car_image).convert("RGB")], k=3)[0]
    assert answer.car_found and len(answer.predictions) == 3
