"""deploy/kserve: the storage layout KServe's TorchServe runtime mounts, served by a real local
TorchServe with that very config.properties, and by TorchServe's real KServe wrapper (kserve 0.13.0,
the runtime image's, from .venv-kserve) in front of it, asked by the Open Inference Protocol's own
client (tritonclient) with car photos."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from helpers import ROOT, extract_protos, python
from tritonclient.utils import InferenceServerException

from carmodel.vehicles import describe
from serving import kserve as assemble
from serving.torchserve import Server, free_port, free_ports

MODEL = "efficientnet_lite0_cars"
ARCHIVE = f"{MODEL}_v1.0.mar"
WRAPPER = (ROOT / ".." / "shared" / "third_party" / "torchserve-kserve-wrapper-0.12.0" / "kserve_wrapper").resolve()
KSERVE_PYTHON = ROOT / ".venv-kserve" / "bin" / "python"  # make env
WRAPPER_PORTS = {"8080", "8081"}  # hard-coded in the wrapper's __main__: HTTP, gRPC
TIMEOUT = 60


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, model_store) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kserve")
    for protocol in ("v1", "v2"):
        result = python(
            "-m",
            "serving.kserve",
            "--archive",
            str(model_store / ARCHIVE),
            "--protocol",
            protocol,
            "--out",
            str(out / protocol),
        )
        assert result.returncode == 0, result.stderr
    return {protocol: out / protocol for protocol in ("v1", "v2")}


def kserve_server(layout: Path, run_dir: Path) -> Server:
    """TorchServe with the layout's own config.properties; only the addresses move to free loopback ports."""
    server = Server(
        run_dir=run_dir,
        model_store=layout / "model-store",
        ports=free_ports(),
        config=layout / "config" / "config.properties",
        host="127.0.0.1",
    )
    try:
        server.start({}, restore=False)  # no --models: the config's model_snapshot loads the archive
        server.wait_ready([MODEL])
    except Exception:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def v2_server(layouts, tmp_path_factory):
    server = kserve_server(layouts["v2"], tmp_path_factory.mktemp("run"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def wrapper_stubs(tmp_path_factory) -> Path:
    """What the runtime image compiles at build time: inference_pb2*.py from TorchServe's protos, for
    kserve 0.13's protobuf 3.20 (protoc 3.20 from .venv-kserve) and grpcio (grpcio-tools' plugin)."""
    protos = extract_protos(tmp_path_factory.mktemp("protos"))
    out = tmp_path_factory.mktemp("wrapper_stubs")
    sources = [str(protos / "proto" / name) for name in ("inference.proto", "management.proto")]
    include = [f"-I{protos / 'proto'}", f"-I{protos}"]
    for cmd in (
        [str(KSERVE_PYTHON.parent / "protoc"), *include, f"--python_out={out}", *sources],
        [sys.executable, "-m", "grpc_tools.protoc", *include, f"--grpc_python_out={out}", *sources],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def wrapper(v2_server, wrapper_stubs, tmp_path_factory):
    """TorchServe's kserve_wrapper, v2 protocol, in front of v2_server, reading v2_server's config as the
    runtime reads /mnt/models/config/config.properties. Yields its HTTP host:port."""
    assert KSERVE_PYTHON.exists(), f"{KSERVE_PYTHON} missing: make env installs kserve 0.13.0 there"
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "CONFIG_PATH": str(v2_server.config_path), "PROTOCOL_VERSION": "v2", "MODEL_LOAD_DELAY": "1"}
    log = tmp_path_factory.mktemp("wrapper") / "wrapper.log"
    cmd = [str(KSERVE_PYTHON), str(ROOT / "tests" / "run_kserve_wrapper.py"), str(WRAPPER), str(wrapper_stubs)]
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, str(http_port), str(grpc_port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(address):
            assert proc.poll() is None and time.monotonic() < deadline, f"wrapper did not start:\n{log.read_text()}"
            time.sleep(0.5)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


def _ready(address: str) -> bool:
    try:
        return requests.get(f"http://{address}/v2/health/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def photos_input(paths: list[Path], binary: bool, name: str = "photos") -> triton.InferInput:
    """One BYTES input holding len(paths) photos: raw bytes (binary extension) or base64 text (JSON)."""
    data = [p.read_bytes() if binary else b64(p).encode() for p in paths]
    tensor = triton.InferInput(name, [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return tensor


def text(element) -> str:
    """A BYTES element as tritonclient gives it: bytes from a binary tensor, str from JSON."""
    return element.decode() if isinstance(element, bytes) else element


def check_answers(result: triton.InferResult, labels: list[str], k: int = 5) -> None:
    names = result.as_numpy("class_names")
    probabilities = result.as_numpy("probabilities")
    assert names.shape == probabilities.shape == result.as_numpy("class_ids").shape == (len(labels), k)
    assert probabilities.dtype == np.float32 and (np.diff(probabilities, axis=1) <= 0).all()
    for label, row in zip(labels, names, strict=True):  # training photos: the label is in the top-5
        assert label.replace("/", "-") in [text(n).replace("/", "-") for n in row]


def test_layout_is_what_the_runtime_expects(layouts, model_store):
    layout = layouts["v2"]
    assert sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file()) == [
        "config/config.properties",
        f"model-store/{MODEL}.mar",  # the wrapper counts only files whose suffixes are exactly ['.mar']
    ]
    props = dict(
        line.split("=", 1) for line in (layout / "config" / "config.properties").read_text().splitlines() if "=" in line
    )
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"].endswith(":8085")  # where KServe's wrapper forwards to
    ports = [props[key].rsplit(":", 1)[1] for key in ("inference_address", "management_address", "metrics_address")]
    assert not WRAPPER_PORTS & {*ports, props["grpc_inference_port"], props["grpc_management_port"]}
    assert props["allowed_urls"] == "^$" and props["enable_model_api"] == "false"
    assert props["service_envelope"] == "kservev2"
    snapshot = json.loads(props["model_snapshot"])
    entry = snapshot["models"][MODEL]["1.0"]
    assert entry["marName"] == f"{MODEL}.mar" and entry["defaultVersion"] is True
    assert entry["batchSize"] == 1  # the KServe envelopes read one request per batch
    assert entry["minWorkers"] == 1 and entry["responseTimeout"] == 60  # the archive's model-config.yaml
    v1 = (layouts["v1"] / "config" / "config.properties").read_text()
    assert "service_envelope=kserve\n" in v1


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_photos_in_one_input_get_one_row_each(v2_server, car_images, binary):
    """tritonclient's defaults (binary tensors) and its JSON mode, straight to TorchServe."""
    client = triton.InferenceServerClient(v2_server.url("inference").split("//")[1])
    labels, paths = list(car_images), list(car_images.values())
    result = client.infer(MODEL, [photos_input(paths, binary)], request_id="cars-1")
    assert result.get_response()["id"] == "cars-1" and result.get_response()["model_name"] == MODEL
    check_answers(result, labels)
    boxes = result.as_numpy("boxes")  # the shipped model localises: the car's box in each photo's pixels
    assert boxes.shape == (len(paths), 4) and (boxes[:, 2:] > boxes[:, :2]).all()


def test_v2_says_car_found_make_and_uncertain_as_typed_tensors(v2_server, car_images, no_car_pictures):
    """The detailed answer's fields as typed outputs; a photo without a car is a row with car_found false."""
    client = triton.InferenceServerClient(v2_server.url("inference").split("//")[1])
    labels = list(car_images)[:2]
    paths = [*list(car_images.values())[:2], no_car_pictures["skimage:cat"]]
    result = client.infer(MODEL, [photos_input(paths, True)])
    found, score = result.as_numpy("car_found"), result.as_numpy("car_score")
    assert found.dtype == np.bool_ and found.tolist() == [True, True, False]
    assert score.dtype == np.float32 and score.shape == (3,) and ((score >= 0) & (score <= 1)).all()
    makes, make_p = result.as_numpy("make"), result.as_numpy("make_probability")
    bodies = result.as_numpy("body_type")
    for label, make, body in zip(labels, makes[:2], bodies[:2], strict=True):
        vehicle = describe(label)
        assert text(make) in ("", vehicle.make) and text(body) == vehicle.body_type
    assert make_p.dtype == np.float32 and text(makes[2]) == "" and make_p[2] == 0
    assert result.as_numpy("uncertain").tolist()[2] is False
    assert result.as_numpy("class_ids")[2].tolist() == [-1] * 5 and result.as_numpy("boxes")[2].tolist() == [-1] * 4


def test_v2_lists_every_car_as_typed_tensors(v2_server, street, car_images, no_car_pictures):
    """A street of three cars, one car and no car in one request: [N, M] car outputs, padded past each photo's cars."""
    client = triton.InferenceServerClient(v2_server.url("inference").split("//")[1])
    paths = [street[0], next(iter(car_images.values())), no_car_pictures["skimage:cat"]]
    result = client.infer(MODEL, [photos_input(paths, True)])
    count = result.as_numpy("car_count")
    assert count.dtype == np.int64 and count[0] >= 3 and count[1] >= 1 and count[2] == 0
    most = int(count.max())
    boxes, scores = result.as_numpy("car_boxes"), result.as_numpy("car_scores")
    assert boxes.shape == (3, most, 4) and scores.shape == (3, most) and boxes.dtype == scores.dtype == np.float32
    assert (boxes[0, : count[0], 2:] > boxes[0, : count[0], :2]).all() and (boxes[2] == -1).all()
    assert boxes[0, 0].tolist() == result.as_numpy("boxes")[0].tolist()  # the answer's own car comes first
    names, ids = result.as_numpy("car_class_names"), result.as_numpy("car_class_ids")
    assert names.shape == ids.shape == (3, most) and ids.dtype == np.int64
    assert text(names[0, 0]) == text(result.as_numpy("class_names")[0, 0]) and (ids[2] == -1).all()
    assert all(text(n) for n in names[0, : count[0]]) and (result.as_numpy("car_probabilities")[2] == 0).all()
    assert result.as_numpy("car_uncertain").dtype == np.bool_ and result.as_numpy("car_makes").shape == (3, most)


def test_v2_several_inputs_requested_outputs_and_topk(v2_server, car_images):
    client = triton.InferenceServerClient(v2_server.url("inference").split("//")[1])
    labels, paths = list(car_images)[:3], list(car_images.values())[:3]
    inputs = [photos_input(paths[:1], True, "front"), photos_input(paths[1:], False, "more")]
    wanted = [triton.InferRequestedOutput("class_names", binary_data=False)]
    result = client.infer(MODEL, inputs, outputs=wanted, parameters={"topk": 3})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["class_names"]
    names = result.as_numpy("class_names")
    assert names.shape == (3, 3)
    assert [text(row[0]).replace("/", "-") for row in names] == [label.replace("/", "-") for label in labels]


def test_v2_a_bad_photo_fails_the_request_with_the_protocols_error(v2_server, car_image):
    client = triton.InferenceServerClient(v2_server.url("inference").split("//")[1])
    bad = triton.InferInput("photos", [2], "BYTES")
    bad.set_data_from_numpy(np.array([car_image.read_bytes(), b"%PDF-1.4 not a photo"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [bad])
    assert caught.value.status() == "415" and "input 'photos' element 1: not an image" in caught.value.message()
    url = f"{v2_server.url('inference')}/v2/models/{MODEL}/infer"
    good = {"name": "photos", "shape": [1], "datatype": "BYTES", "data": [b64(car_image)]}
    for body, status, says in [
        ({"inputs": [{**good, "datatype": "UINT8", "data": [1]}]}, 400, "datatype BYTES"),
        ({"inputs": [{**good, "shape": [2]}]}, 400, "holds 2 elements, data has 1"),
        ({"inputs": []}, 400, "non-empty 'inputs'"),
        ({"inputs": [good], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
        ({"inputs": [{**good, "data": ["not base64!"]}]}, 400, "not valid base64"),
    ]:
        r = requests.post(url, json=body, timeout=TIMEOUT)
        assert r.status_code == status and says in r.json()["error"], (body, r.text)


def test_bare_torchserve_has_no_v2_health_or_metadata(v2_server):
    """TorchServe 0.12 routes only .../infer of the v2 paths: health and metadata come from the wrapper
    (in a pod) and /ping, /models (bare). Pinned; README, "KServe", says so."""
    base = v2_server.url("inference")
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}"):
        assert requests.get(base + path, timeout=TIMEOUT).status_code == 404, path
    assert requests.get(base + "/ping", timeout=TIMEOUT).json()["status"] == "Healthy"


def test_wrapper_loads_the_layout_and_answers_health(wrapper):
    client = triton.InferenceServerClient(wrapper)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    # kserve 0.13's wrapper declares no tensors (TorchserveModel has no input/output types): README lists them
    assert metadata["name"] == MODEL and metadata["inputs"] == [] and metadata["outputs"] == []


def test_wrapper_forwards_photos_in_one_input(wrapper, car_images):
    client = triton.InferenceServerClient(wrapper)
    labels, paths = list(car_images), list(car_images.values())
    check_answers(client.infer(MODEL, [photos_input(paths, binary=False)]), labels)


def test_wrapper_limits_pinned(wrapper, car_image):
    """What kserve 0.13 does that our layer cannot change (README, "KServe"): it cannot read binary
    tensors (400), and it turns TorchServe's 4xx into a 500 that carries our message."""
    client = triton.InferenceServerClient(wrapper)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [photos_input([car_image], binary=True)])
    assert caught.value.status() == "400"
    bad = triton.InferInput("photos", [1], "BYTES")
    bad.set_data_from_numpy(np.array([base64.b64encode(b"%PDF-1.4")], dtype=np.object_), binary_data=False)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [bad])
    assert caught.value.status() == "500" and "input 'photos' element 0: not an image" in caught.value.message()


def test_v1_predict_with_a_car_photo(layouts, tmp_path, car_images):
    server = kserve_server(layouts["v1"], tmp_path / "run")
    try:
        label, path = next(iter(car_images.items()))
        r = requests.post(
            f"{server.url('inference')}/v1/models/{MODEL}:predict",
            json={"instances": [{"data": b64(path)}]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        (top5,) = r.json()["predictions"]
        assert top5[0]["class_name"].replace("/", "-") == label.replace("/", "-")
    finally:
        server.stop()


def test_assemble_refuses_a_missing_or_broken_archive(tmp_path):
    with pytest.raises(assemble.AssembleError, match="archive not found"):
        assemble.assemble(tmp_path / "nope.mar", tmp_path / "out")
    broken = tmp_path / "broken.mar"
    broken.write_bytes(b"not a zip")
    with pytest.raises(assemble.AssembleError, match="not a readable .mar"):
        assemble.assemble(broken, tmp_path / "out")
