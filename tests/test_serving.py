"""The handler inside a real TorchServe over real HTTP, with real car photos.

Every test uses the session `server` (both models, v1.0). The handler's own steps (a batch of good
and bad requests, the archive's settings and thresholds, the decoding budget) are tested in-process
in tests/test_handler.py; here is what only a real server shows.

The shipped export may be a provisional one, so no test asserts which class a photo gets: only
that every answer is a valid, consistent top-k list, or a 4xx JSON error that says why.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import time
import zipfile

import numpy as np
import pytest
import requests
from helpers import (
    DEFAULT,
    TIMEOUT,
    check_error,
    check_predictions,
    encode,
    iou,
    management,
    png_declaring,
    post_raw,
    predict_url,
    worker_pids,
)
from PIL import Image
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from carmodel.vehicles import BODY_TYPES, describe

RESNET = "resnet50_cars"
MODELS = (DEFAULT, RESNET)


# ---------------------------------------------------------------------------- helpers


def registered(server) -> list[tuple[str, str]]:
    response = management(server, "/models", params={"limit": 100})
    assert response.status_code == 200, response.text
    return sorted((m["modelName"], m["modelUrl"]) for m in response.json()["models"])


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def names(model_store) -> dict[str, dict[str, str]]:
    """index_to_name.json of each archive the server loaded (not models/, which may be re-exported meanwhile)."""
    out = {}
    for model in MODELS:
        with zipfile.ZipFile(model_store / f"{model}_v1.0.mar") as mar:
            out[model] = json.loads(mar.read("index_to_name.json"))
    return out


@pytest.fixture(scope="module")
def corrupt(photo) -> dict[str, tuple[bytes, int]]:
    """Broken uploads and the status each must get."""
    return {
        "random": (random.Random(0).randbytes(8192), 415),  # seeded: a leading "{" would be a JSON error
        "html": (b"<html><body>not a car</body></html>", 415),
        "truncated_jpeg": (photo[: len(photo) // 2], 422),
        "one_pixel": (encode(Image.new("RGB", (1, 1)), "PNG"), 422),
        "bomb": (png_declaring(100_000, 100_000), 413),
    }


# ---------------------------------------------------------------------------- request formats


@pytest.mark.parametrize("model", MODELS)
def test_raw_body_put_like_curl_T(server, names, photo, model):
    response = requests.put(
        predict_url(server, model), data=photo, headers={"Content-Type": "application/octet-stream"}, timeout=TIMEOUT
    )
    check_predictions(response, names[model])


@pytest.mark.parametrize("model", MODELS)
def test_raw_body_post_every_photo(server, names, photos, model):
    for data in photos:
        check_predictions(post_raw(server, data, model), names[model])


def test_raw_body_with_image_content_type(server, names, photo):
    response = requests.post(predict_url(server), data=photo, headers={"Content-Type": "image/jpeg"}, timeout=TIMEOUT)
    check_predictions(response, names[DEFAULT])


def test_same_photo_same_answer_across_formats(server, names, photo):
    """Raw body, multipart and base64 JSON are the same request: same classes, same probabilities."""
    raw = check_predictions(post_raw(server, photo), names[DEFAULT])
    multipart = requests.post(predict_url(server), files={"data": ("car.jpg", photo, "image/jpeg")}, timeout=TIMEOUT)
    as_json = requests.post(
        predict_url(server), json={"image": base64.b64encode(photo).decode(), "topk": 5}, timeout=TIMEOUT
    )
    assert check_predictions(multipart, names[DEFAULT]) == raw
    assert check_predictions(as_json, names[DEFAULT]) == raw


@pytest.mark.parametrize("model", MODELS)
def test_multipart_data_field(server, names, photo, model):
    response = requests.post(predict_url(server, model), files={"data": ("car.jpg", photo, "image/jpeg")}, timeout=60)
    check_predictions(response, names[model])


def test_multipart_with_topk_field(server, names, photo):
    response = requests.post(
        predict_url(server), files={"data": ("car.jpg", photo, "image/jpeg")}, data={"topk": "2"}, timeout=TIMEOUT
    )
    check_predictions(response, names[DEFAULT], k=2)


@pytest.mark.parametrize("model", MODELS)
def test_json_base64_body(server, names, photo, model):
    response = requests.post(
        predict_url(server, model), json={"image": base64.b64encode(photo).decode(), "topk": 3}, timeout=TIMEOUT
    )
    check_predictions(response, names[model], k=3)


def test_json_data_url(server, names, photo):
    url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    check_predictions(requests.post(predict_url(server), json={"image": url}, timeout=TIMEOUT), names[DEFAULT])


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_header(server, names, photo, k):
    check_predictions(post_raw(server, photo, **{"X-Top-K": str(k)}), names[DEFAULT], k=k)


def test_top_k_header_with_the_whole_label_set(server, names, photo):
    predictions = check_predictions(post_raw(server, photo, RESNET, **{"X-Top-K": "196"}), names[RESNET], k=196)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("value", ["abc", "0", "-3", "197", "2.5"])
def test_bad_top_k_header_is_400_json(server, photo, value):
    check_error(post_raw(server, photo, **{"X-Top-K": value}), 400)


def test_the_box_comes_only_when_asked_for(server, names, photo, car_rgb):
    """Without asking, the plain top-k list (today's clients); asked for by header, multipart field
    or JSON field, the top-k under "predictions" and the car's box inside the image."""
    check_predictions(post_raw(server, photo), names[DEFAULT], k=5)
    answers = [
        post_raw(server, photo, **{"X-Box": "true", "X-Top-K": "2"}),
        requests.post(
            predict_url(server), files={"data": ("car.jpg", photo)}, data={"box": "1", "topk": "2"}, timeout=TIMEOUT
        ),
        requests.post(
            predict_url(server),
            json={"image": base64.b64encode(photo).decode(), "box": True, "topk": 2},
            timeout=TIMEOUT,
        ),
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"predictions", "box", "boxes"} and len(answer["predictions"]) == 2
        assert answer["predictions"][0]["class_name"] in names[DEFAULT].values()
        assert answer["boxes"][0] == answer["box"]  # every car's box, the answer's own first
        x1, y1, x2, y2 = answer["box"]
        assert 0 <= x1 < x2 <= car_rgb.width and 0 <= y1 < y2 <= car_rgb.height
    assert post_raw(server, photo, **{"X-Box": "false"}).json()[0]["class_name"] in names[DEFAULT].values()


def test_a_model_without_a_box_head_answers_box_null(server, names, photo):
    response = post_raw(server, photo, RESNET, **{"X-Box": "true"})
    assert response.status_code == 200, response.text
    assert response.json()["box"] is None and len(response.json()["predictions"]) == 5


def test_the_detailed_answer_by_header_or_field(server, names, photo, car_rgb):
    """X-Details (or a details field): the car found with its score and box, the make and body type with
    their summed probabilities, uncertain, and the top-k rows."""
    answers = [
        post_raw(server, photo, **{"X-Details": "true", "X-Top-K": "3"}),
        requests.post(
            predict_url(server), files={"data": ("car.jpg", photo)}, data={"details": "1", "topk": "3"}, timeout=TIMEOUT
        ),
        requests.post(
            predict_url(server),
            json={"image": base64.b64encode(photo).decode(), "details": True, "topk": 3},
            timeout=TIMEOUT,
        ),
    ]
    for response in answers:
        assert response.status_code == 200 and response.headers["Content-Type"] == "application/json", response.text
        answer = response.json()
        assert set(answer) == {"car", "make", "body_type", "uncertain", "predictions", "cars"}
        assert answer["car"]["found"] is True and 0 <= answer["car"]["score"] <= 1
        first = answer["cars"][0]  # every car found, the most prominent first: the answer's own
        assert [first["box"], first["score"], first["predictions"]] == [
            answer["car"]["box"], answer["car"]["score"], answer["predictions"]
        ]  # fmt: skip
        x1, y1, x2, y2 = answer["car"]["box"]
        assert 0 <= x1 < x2 <= car_rgb.width and 0 <= y1 < y2 <= car_rgb.height
        assert len(answer["predictions"]) == 3 and answer["predictions"][0]["class_name"] in names[DEFAULT].values()
        assert answer["body_type"]["name"] in BODY_TYPES and isinstance(answer["uncertain"], bool)
    assert answers[0].json() == answers[1].json() == answers[2].json()  # one answer, whichever way it was asked


def test_every_car_of_a_street_is_found_boxed_and_classified(server, names, street):
    """Three cars side by side: each found with its own box and answer, the most prominent first; the plain
    answer and the top-level fields are that car's; X-Box gives every box."""
    path, truths = street
    answer = post_raw(server, path.read_bytes(), **{"X-Details": "true", "X-Top-K": "3"}).json()
    cars = answer["cars"]
    assert answer["car"]["found"] and 3 <= len(cars) <= 10
    for truth in truths:  # each car, and only once
        assert sum(iou(car["box"], truth) >= 0.5 for car in cars) == 1, (truth, [c["box"] for c in cars])
    prominence = [(c["box"][2] - c["box"][0]) * (c["box"][3] - c["box"][1]) * c["score"] for c in cars]
    assert prominence == sorted(prominence, reverse=True)
    assert [answer["car"]["box"], answer["predictions"]] == [cars[0]["box"], cars[0]["predictions"]]
    for car in cars:
        assert len(car["predictions"]) == 3 and car["predictions"][0]["class_name"] in names[DEFAULT].values()
        assert car["body_type"]["name"] in BODY_TYPES and 0 <= car["score"] <= 1
    plain = post_raw(server, path.read_bytes(), **{"X-Top-K": "3"}).json()
    assert plain == cars[0]["predictions"]  # today's clients: the most prominent car's rows
    boxed = post_raw(server, path.read_bytes(), **{"X-Box": "true"}).json()
    assert boxed["boxes"] == [car["box"] for car in cars] and boxed["box"] == cars[0]["box"]


def test_a_model_without_box_or_car_head_answers_the_same_shape(server, names, photo):
    """No car head: always a car, score null; no calibration: never uncertain, the make always named."""
    answer = post_raw(server, photo, RESNET, **{"X-Details": "true"}).json()
    assert answer["car"] == {"found": True, "score": None, "box": None} and answer["uncertain"] is False
    assert len(answer["predictions"]) == 5
    assert answer["make"]["name"] in {describe(name).make for name in names[RESNET].values()}


@pytest.mark.parametrize("header", ["X-Box", "X-Details"])
def test_bad_answer_shape_flag_is_400_json(server, photo, header):
    check_error(post_raw(server, photo, **{header: "perhaps"}), 400)


def test_bad_topk_in_json_is_400_json(server, photo):
    response = requests.post(
        predict_url(server), json={"image": base64.b64encode(photo).decode(), "topk": 0}, timeout=TIMEOUT
    )
    check_error(response, 400)


@pytest.mark.parametrize(
    "body",
    [{"picture": "aGVsbG8="}, {"image": "not base64 at all!"}, [1, 2, 3]],
    ids=["no-image-field", "bad-base64", "json-list"],
)
def test_malformed_json_is_400_json(server, body):
    check_error(requests.post(predict_url(server), json=body, timeout=TIMEOUT), 400)


# ---------------------------------------------------------------------------- image modes over HTTP


def _rgba(img: Image.Image) -> Image.Image:
    out = img.convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    alpha.paste(0, (0, 0, img.width // 3, img.height))
    out.putalpha(alpha)
    return out


def _sixteen_bit(img: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))


def _exif_rotated(img: Image.Image) -> bytes:
    """As a phone saves a photo held upright: the pixels turned a quarter, EXIF orientation 6 to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.rotate(90, expand=True), "JPEG", quality=90, exif=exif.tobytes())


MODES = {
    "grayscale": lambda img: encode(img.convert("L"), "JPEG"),
    "rgba_png": lambda img: encode(_rgba(img), "PNG"),
    "cmyk_jpeg": lambda img: encode(img.convert("CMYK"), "JPEG"),
    "palette_png": lambda img: encode(img.convert("P"), "PNG", transparency=0),
    "png_16_bit": lambda img: encode(_sixteen_bit(img), "PNG"),
    "exif_rotated": _exif_rotated,
    "webp": lambda img: encode(img, "WEBP", quality=85),
    "animated_gif": lambda img: encode(img, "GIF", save_all=True, append_images=[img.rotate(180)]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_odd_image_modes_are_classified(server, names, car_rgb, mode):
    check_predictions(post_raw(server, MODES[mode](car_rgb)), names[DEFAULT])


def test_grayscale_photo_gives_the_same_answer_as_its_rgb_copy(server, names, car_rgb):
    """`L` is expanded to RGB the way PIL does it: identical pixels, identical predictions."""
    gray = car_rgb.convert("L")
    a = check_predictions(post_raw(server, encode(gray, "PNG")), names[DEFAULT])
    b = check_predictions(post_raw(server, encode(gray.convert("RGB"), "PNG")), names[DEFAULT])
    assert a == b


# ---------------------------------------------------------------------------- bad input, worker survives


def test_corrupt_images_get_json_errors_and_the_worker_survives(server, names, photo, corrupt):
    """The ResNet-50 (one pass, no box head) refuses as the default model does (tests/test_robustness.py's corpus)."""
    pids = worker_pids(server, RESNET)
    for name, (data, status) in corrupt.items():
        body = check_error(post_raw(server, data, RESNET), status)
        assert body["type"] == "InputError", name
    check_error(post_raw(server, b"", RESNET), 400)
    assert worker_pids(server, RESNET) == pids  # no crash, no restart
    check_predictions(post_raw(server, photo, RESNET), names[RESNET])


# ---------------------------------------------------------------------------- metrics


def _metrics_text(server) -> str:
    response = requests.get(f"{server.url('metrics')}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    return response.text


def _families(text: str) -> dict[str, Metric]:
    """The scrape read by Prometheus's own Python parser (a counter's family drops `_total`)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples(family: Metric | None, model: str, **labels: str) -> list[Sample]:
    """A family's samples for `model` (TorchServe's label is ModelName or model_name) with `labels`."""
    return [
        s
        for s in (family.samples if family else [])
        if model in (s.labels.get("ModelName"), s.labels.get("model_name"))
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_metrics_after_a_prediction(server, names, photo, corrupt):
    predictions = check_predictions(post_raw(server, photo, RESNET), names[RESNET])
    check_error(post_raw(server, corrupt["random"][0], RESNET), 415)
    wanted = {  # family: type (serving/metrics.py for ours)
        "ts_inference_requests": "counter",
        "ts_inference_latency_microseconds": "counter",
        "ts_queue_latency_microseconds": "counter",
        "car_preprocess_seconds": "histogram",
        "car_inference_seconds": "histogram",
        "car_top1_probability": "histogram",
        "car_predictions": "counter",
        "car_input_errors": "counter",
        "car_stage_seconds": "counter",
        "car_stage_images": "counter",
    }
    deadline = time.monotonic() + 30  # handler metrics reach the frontend through the worker's log
    while True:
        families = _families(_metrics_text(server))
        found = {name for name in wanted if _samples(families.get(name), RESNET)}
        if found == set(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found == set(wanted), f"missing: {sorted(set(wanted) - found)}"
    assert {name: families[name].type for name in wanted} == wanted

    assert any(s.value >= 2 for s in _samples(families["ts_inference_requests"], RESNET))
    # The class the photo was given is counted under its own name; the refusal under its status.
    top1 = predictions[0]["class_name"]
    assert _samples(families["car_predictions"], RESNET, class_name=top1)[0].value >= 1
    assert _samples(families["car_input_errors"], RESNET, status="415")[0].value >= 1
    # Latencies in seconds, the top-1 probability in 0-1: every observation in the buckets up to 1
    for name in ("car_inference_seconds", "car_top1_probability"):
        buckets = {s.labels["le"]: s.value for s in _samples(families[name], RESNET) if s.name.endswith("_bucket")}
        assert buckets["1.0"] == buckets["+Inf"] >= 1, (name, buckets)
    probability = _samples(families["car_top1_probability"], RESNET)
    total = next(s.value for s in probability if s.name.endswith("_sum"))
    count = next(s.value for s in probability if s.name.endswith("_count"))
    assert 0 < total / count <= 1


def test_metrics_pass_promtool_but_for_torchserve_names(server, names, photo):
    """`promtool check metrics`: what remains is TorchServe's own naming, each kind explained in the
    README ("Metrics"): its metric names, and the ModelName label it adds to every model metric."""
    check_predictions(post_raw(server, photo, RESNET), names[RESNET])
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: make env installs it (Debian's prometheus package)"
    text = _metrics_text(server)
    assert "car_top1_probability_bucket" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    warnings = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    ours = [w for w in warnings if w.startswith("car_")]
    assert all(w.endswith("label names should be written in 'snake_case' not 'camelCase'") for w in ours), ours
    theirs = {w.split()[0] for w in warnings} - {w.split()[0] for w in ours}
    assert theirs <= TORCHSERVE_METRICS, sorted(theirs - TORCHSERVE_METRICS)


# TorchServe names these itself (front end and system metrics); serving/metrics.yaml only switches them on.
TORCHSERVE_METRICS = {
    "Requests2XX",
    "Requests4XX",
    "Requests5XX",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
    "QueueTime",
    "WorkerThreadTime",
    "WorkerLoadTime",
    "CPUUtilization",
    "MemoryUsed",
    "MemoryAvailable",
    "MemoryUtilization",
    "DiskUsage",
    "DiskUtilization",
    "DiskAvailable",
    "GPUMemoryUtilization",
    "GPUMemoryUsed",
    "GPUUtilization",
    "HandlerTime",
    "PredictionTime",
}


# ---------------------------------------------------------------------------- registration is locked to the store


def test_only_model_store_archives_can_be_registered(server, model_store, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "evil_v1.0.mar"
    shutil.copy(model_store / f"{RESNET}_v1.0.mar", outside)  # a real, loadable archive
    refused = [
        "https://example.com/x.mar",
        "http://127.0.0.1:1/x.mar",
        "https://github.com/pytorch/serve/raw/master/x.mar",
        f"file://{model_store}/../x.mar",
        f"file://{model_store}/../{model_store.name}/{RESNET}_v1.0.mar",  # in the store, but via ..
        "../../etc/passwd",
        "../x.mar",
        f"file://{outside}",
        str(outside),
        "file:///etc/passwd",
    ]
    before_models, before_files = registered(server), sorted(p.name for p in model_store.iterdir())
    accepted = []
    try:
        for url in refused:
            response = management(
                server, "/models", "POST", params={"url": url, "model_name": "evil", "initial_workers": 1}
            )
            if not 400 <= response.status_code < 500:
                accepted.append((url, response.status_code, response.text[:200]))
            assert registered(server) == before_models, url
        assert not accepted, accepted
        assert sorted(p.name for p in model_store.iterdir()) == before_files
    finally:  # never leave a stray model on the shared server
        for name, _ in set(registered(server)) - set(before_models):
            management(server, f"/models/{name}", "DELETE")


# ---------------------------------------------------------------------------- what the worker's metrics reach
# (a batch of good and bad requests, the archive's settings and thresholds: tests/test_handler.py, in-process)


def test_answers_without_a_car_reach_the_metrics_endpoint(server, no_car_pictures):
    """The handler's counters travel through the worker's log to the front end's Prometheus endpoint; the
    histogram of cars per picture counts this one at 0."""
    assert post_raw(server, no_car_pictures["skimage:cat"].read_bytes()).json() == []
    deadline = time.monotonic() + 30
    while not (samples := _samples(_families(_metrics_text(server)).get("car_no_car"), DEFAULT)):
        assert time.monotonic() < deadline, "car_no_car not counted"
        time.sleep(0.5)
    assert samples[0].value >= 1
    cars = _samples(_families(_metrics_text(server)).get("car_cars_per_image"), DEFAULT)
    buckets = {s.labels["le"]: s.value for s in cars if s.name.endswith("_bucket")}
    assert _families(_metrics_text(server))["car_cars_per_image"].type == "histogram" and buckets["0.005"] >= 1


def test_archive_in_another_folder_named_model_store_is_refused(server, tmp_path):
    other = tmp_path / "model_store"
    other.mkdir()
    shutil.copy(server.model_store / f"{DEFAULT}_v1.0.mar", other / "evil_v1.0.mar")
    before = registered(server)
    try:
        response = management(
            server,
            "/models",
            "POST",
            params={"url": f"file://{other}/evil_v1.0.mar", "model_name": "evil", "initial_workers": 0},
        )
        assert 400 <= response.status_code < 500, response.text
        assert registered(server) == before
    finally:  # never leave a stray model on the shared server
        for name, _ in set(registered(server)) - set(before):
            management(server, f"/models/{name}", "DELETE")
