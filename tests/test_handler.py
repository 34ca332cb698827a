"""The handler in-process, driven as TorchServe's Python worker drives it, without the Java front end.

The archive build-mar made is unpacked as TorchServe unpacks it; TorchServe's own model loader
(ts.model_loader) imports the handler from there, checks it defines one class, builds the `Context`
with the archive's model-config.yaml and the handler's declared metrics, and initializes it; each
batch goes through TorchServe's own request parsing (ts.service.Service.retrieve_data_for_inference),
then to the handler's entry point, as `Service.predict` does before it encodes the answers for the
front end. TorchServe's `MockContext` lacks what this handler reads (the model's name, the requests'
headers, the per-request statuses), so the worker's real `Context` is used. What only a real server
shows (HTTP, batching across connections, gRPC, the front end's own limits) stays in the server tests.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from bad_inputs import corpus
from helpers import DEFAULT, encode
from PIL import Image
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory
from ts.service import Service

from carmodel.images import ImageLimits
from handler.metrics import (
    INPUT_ERRORS,
    NO_CAR,
    PREDICTIONS,
    STAGE_SECONDS_HISTOGRAM,
    TOP1_PROBABILITY,
    UNCERTAIN,
)
from serving.torchserve import HANDLER_METRICS

ROW_KEYS = {"class_id", "class_name", "probability", "make", "model", "year", "body_type"}


def unpack(archive: Path, folder: Path, **handler_settings) -> Path:
    """The .mar unpacked as TorchServe unpacks it, its model-config.yaml's handler section changed."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    config_path = folder / "model-config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["handler"].update(handler_settings)
    config_path.write_text(yaml.safe_dump(config))
    return folder


class Worker:
    """One model loaded by TorchServe's own loader, answering batches as its worker would."""

    def __init__(self, model_dir: Path, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.syspath_prepend(str(model_dir))  # the worker imports the handler from the unpacked archive
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        self.metrics = MetricsCacheYamlImpl(config_file_path=str(HANDLER_METRICS))
        self.metrics.initialize_cache()
        self.metrics.model_name = DEFAULT
        self.service = ModelLoaderFactory.get_model_loader().load(
            DEFAULT, str(model_dir), manifest["model"]["handler"], None, 8, None, True, self.metrics
        )
        self.handler = self.service._entry_point.__self__  # the one CarClassifier the loader made

    def ask(self, *requests: dict) -> list[tuple[int, dict, object]]:
        """Each request: {"parameters": {name: (value, content type)}, "headers": {name: value}}. Returns
        each one's (status, response headers, answer) as the front end would receive them."""
        batch = [
            {
                "requestId": f"r{idx}".encode(),
                "parameters": [
                    {"name": name, "value": value, "contentType": content_type}
                    for name, (value, content_type) in request.get("parameters", {}).items()
                ],
                "headers": [{"name": k.encode(), "value": v.encode()} for k, v in request.get("headers", {}).items()],
            }
            for idx, request in enumerate(requests)
        ]
        processors, rows, ids = Service.retrieve_data_for_inference(batch)
        context = self.service.context
        context.request_ids, context.request_processor, context.metrics.request_ids = ids, processors, ids
        answers = self.service._entry_point(rows, context)
        return [
            (p.get_response_status_code(), p.get_response_headers(), answer)
            for p, answer in zip(processors, answers, strict=True)
        ]


def raw(body: bytes, content_type: str = "image/jpeg", **headers: str) -> dict:
    """A raw body as the front end hands over an HTTP request (HTTP headers: not a gRPC call)."""
    return {"parameters": {"body": (body, content_type)}, "headers": {"Host": "127.0.0.1", **headers}}


@pytest.fixture(scope="module")
def archive(default_store) -> Path:
    return default_store / f"{DEFAULT}_v1.0.mar"


@pytest.fixture(scope="module")
def corrupt_bodies(photo) -> list[bytes]:
    """Bad uploads of every kind the handler refuses (tests/bad_inputs.py), small ones."""
    return [case.data for case in corpus(photo, ImageLimits().max_bytes) if case.data and len(case.data) < 100_000]


@pytest.fixture(scope="module")
def worker(archive, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield Worker(unpack(archive, tmp_path_factory.mktemp("unpacked")), monkeypatch)


def test_the_loader_takes_the_handler_and_its_settings_from_the_archive(worker, archive):
    with zipfile.ZipFile(archive) as mar:
        settings = yaml.safe_load(mar.read("model-config.yaml"))["handler"]
    description = worker.handler.describe_handle()
    assert description["load_error"] is None and description["settings"] == settings
    assert (description["backend"], description["precision"]) == ("openvino", "int8")
    assert type(worker.handler).__name__ == "CarClassifier"


def test_a_batch_answers_each_request_in_the_shape_it_asked(worker, photo, photos):
    b64 = base64.b64encode(photos[1]).decode()
    answers = worker.ask(
        raw(photo),
        raw(b"%PDF-1.7 not a photo", "application/octet-stream"),
        {"parameters": {"body": ({"image": b64, "details": "true"}, "application/json")}, "headers": {"Host": "x"}},
        raw(photo, **{"X-Top-K": "2", "X-Box": "true"}),
        raw(photo[: len(photo) // 3]),
    )
    assert [status for status, _, _ in answers] == [200, 415, 200, 200, 422]
    assert all(headers["content-type"] == "application/json" for _, headers, _ in answers)
    assert not any("ts_stream_next" in headers for _, headers, _ in answers)  # gRPC's marker only on gRPC calls
    plain, pdf, detailed, boxed, truncated = (answer for _, _, answer in answers)
    assert len(plain) == 5 and set(plain[0]) == ROW_KEYS
    for refused, status in ((pdf, 415), (truncated, 422)):  # StatusError.to_json: the project's one error body
        assert set(refused) == {"code", "type", "message"} and refused["code"] == status
        assert refused["type"] == "InputError" and refused["message"]
    assert (
        set(detailed) == {"car", "make", "body_type", "uncertain", "predictions", "cars"} and detailed["car"]["found"]
    )
    assert len(boxed["predictions"]) == 2 and len(boxed["box"]) == 4
    assert plain == worker.ask(raw(photo))[0][2]  # its neighbours' failures change nothing of an answer


def test_answers_are_counted_in_the_declared_metrics(worker, photo, no_car_pictures, caplog):
    """TorchServe's metric objects log each update; the front end turns those lines into its metrics."""
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        worker.ask(raw(photo), raw(no_car_pictures["skimage:cat"].read_bytes()), raw(b"", "image/jpeg"))
    emitted = "\n".join(record.getMessage() for record in caplog.records)
    for name in (PREDICTIONS, NO_CAR, INPUT_ERRORS, TOP1_PROBABILITY, *STAGE_SECONDS_HISTOGRAM.values()):
        assert f"{name}." in emitted, name
    declared = {
        m["name"] for kind in yaml.safe_load(HANDLER_METRICS.read_text())["model_metrics"].values() for m in kind
    }
    assert {PREDICTIONS, NO_CAR, UNCERTAIN, INPUT_ERRORS, TOP1_PROBABILITY} <= declared


def test_thresholds_and_top_k_limit_are_the_archives(archive, tmp_path, photo, no_car_pictures, monkeypatch):
    """Nothing is sure and everything is a car: the archive's thresholds override the model's own."""
    model_dir = unpack(archive, tmp_path / "m", sure_threshold=1.0, car_threshold=0.0, max_topk=50)
    worker = Worker(model_dir, monkeypatch)
    cat = no_car_pictures["skimage:cat"].read_bytes()
    (_, _, answer), (_, _, car) = worker.ask(raw(cat, **{"X-Details": "true"}), raw(photo, **{"X-Details": "true"}))
    assert answer["car"]["found"] is True and answer["uncertain"] is True
    assert car["uncertain"] is True
    calibration = worker.handler.describe_handle()["calibration"]
    assert (calibration["sure_threshold"], calibration["car_threshold"]) == (1.0, 0.0)
    assert len(worker.ask(raw(photo, **{"X-Top-K": "50"}))[0][2]) == 50
    status, _, error = worker.ask(raw(photo, **{"X-Top-K": "51"}))[0]
    assert status == 400 and "between 1 and 50" in error["message"]


def test_with_flip_a_car_and_its_mirror_image_get_one_answer(worker, archive, tmp_path, car_rgb, monkeypatch):
    """The archive's `flip`: each car classified mirrored too, the two averaged, so a photo and its mirror
    image are answered alike (up to the detector's box, which is not exactly mirrored); without it they are
    two different inputs. A thumbnail, whose answers are less certain than a large crop's."""
    thumbnail = car_rgb.resize((96, round(96 * car_rgb.height / car_rgb.width)))
    sent = [encode(image, "PNG") for image in (thumbnail, thumbnail.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    flipping = Worker(unpack(archive, tmp_path / "m", flip=True), monkeypatch)

    def apart(answering: Worker) -> float:
        """How far the answers to the photo and to its mirror image are apart: L1 over every class."""
        photo, mirrored = (
            {row["class_id"]: row["probability"] for row in answer}
            for _, _, answer in answering.ask(*(raw(body, "image/png", **{"X-Top-K": "196"}) for body in sent))
        )
        return sum(abs(photo[c] - mirrored.get(c, 0.0)) for c in photo)

    plain, flipped = apart(worker), apart(flipping)
    print(f"L1 apart: {plain:.4f} plain, {flipped:.4f} with flip")
    assert flipped < plain / 3
    assert flipping.handler.describe_handle()["settings"]["flip"] is True


def test_past_the_decoding_budget_an_image_is_told_to_retry(archive, tmp_path, car_rgb, monkeypatch):
    big = encode(car_rgb.resize((1500, 1000)), "PNG")  # 1.5 megapixels, no DCT shortcut
    worker = Worker(unpack(archive, tmp_path / "m", batch_decode_pixels=2_000_000), monkeypatch)
    answers = worker.ask(raw(big, "image/png"), raw(big, "image/png"), raw(big, "image/png"))
    assert [status for status, _, _ in answers] == [200, 503, 503]
    for _, headers, error in answers[1:]:
        assert headers["Retry-After"] == "1" and error["type"] == "BusyError" and "retry" in error["message"]


def test_a_model_that_cannot_load_answers_503_with_the_reason(archive, tmp_path, photo, monkeypatch):
    model_dir = unpack(archive, tmp_path / "m")
    weights = model_dir / f"{DEFAULT}.pth"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short: a disk or a copy gone wrong
    worker = Worker(model_dir, monkeypatch)
    assert worker.handler.describe_handle()["load_error"].startswith("model failed to load")
    for status, _, error in worker.ask(raw(photo), raw(photo)):
        assert status == 503 and error["type"] == "ModelLoadError" and "failed to load" in error["message"]


def test_the_workers_memory_does_not_grow_with_the_requests(worker, photos, corrupt_bodies):
    """Native memory, which tracemalloc does not see: images opened in one thread and decoded in another
    once kept ~55 kB per request (33 MB over these 600); now they are opened where they are decoded."""

    def body(n: int) -> bytes:  # three photos to one bad upload, as the load test mixes them
        return corrupt_bodies[n // 4 % len(corrupt_bodies)] if n % 4 == 3 else photos[n % len(photos)]

    def send(count: int) -> None:
        for start in range(0, count, 8):
            worker.ask(*(raw(body(start + i)) for i in range(8)))

    send(200)  # the allocator's pools and the runners' buffers settle first
    before = psutil.Process().memory_info().rss
    send(600)
    assert (psutil.Process().memory_info().rss - before) / 2**20 < 15


def test_an_animated_gif_is_classified_by_its_first_frame(worker, car_rgb):
    frames = [car_rgb.resize((320, 200)), Image.new("RGB", (320, 200), "black")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    (status, _, rows), (_, _, first) = worker.ask(raw(gif, "image/gif"), raw(encode(frames[0], "GIF"), "image/gif"))
    assert status == 200 and rows == first


def test_the_worker_imports_the_handler_from_the_archive(worker):
    """The loader imported car_handler.py from the unpacked archive, as the worker does, not from this checkout."""
    module = sys.modules[type(worker.handler).__module__]
    assert module.__name__ == "car_handler" and (Path(module.__file__).parent / "MAR-INF").is_dir()
