"""deploy/kserve: the storage layout KServe's TorchServe runtime mounts, served by a real local
TorchServe with that very config.properties, answering real v2 and v1 requests with car photos."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import requests
from helpers import python

from serving import kserve as assemble
from serving.torchserve import Server, free_ports

MODEL = "efficientnet_lite0_cars"
ARCHIVE = f"{MODEL}_v1.0.mar"


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


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_layout_is_what_the_runtime_expects(layouts, model_store):
    layout = layouts["v2"]
    assert sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file()) == [
        "config/config.properties",
        f"model-store/{ARCHIVE}",
    ]
    props = dict(
        line.split("=", 1) for line in (layout / "config" / "config.properties").read_text().splitlines() if "=" in line
    )
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"].endswith(":8085")  # where KServe's wrapper forwards to
    assert props["allowed_urls"] == "^$" and props["enable_model_api"] == "false"
    assert props["service_envelope"] == "kservev2"
    snapshot = json.loads(props["model_snapshot"])
    entry = snapshot["models"][MODEL]["1.0"]
    assert entry["marName"] == ARCHIVE and entry["defaultVersion"] is True
    assert entry["batchSize"] == 1  # the KServe envelopes read one request per batch
    assert entry["minWorkers"] == 1 and entry["responseTimeout"] == 60  # the archive's model-config.yaml
    v1 = (layouts["v1"] / "config" / "config.properties").read_text()
    assert "service_envelope=kserve\n" in v1


def test_v2_infer_with_car_photos(layouts, tmp_path, car_images):
    server = kserve_server(layouts["v2"], tmp_path / "run")
    try:
        photos = list(car_images.items())[:3]
        body = {
            "id": "cars-1",
            "inputs": [
                {"name": f"car{i}", "shape": [1], "datatype": "BYTES", "data": [b64(path)]}
                for i, (_, path) in enumerate(photos)
            ],
        }
        r = requests.post(f"{server.url('inference')}/v2/models/{MODEL}/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["id"] == "cars-1" and answer["model_name"] == MODEL
        assert [o["name"] for o in answer["outputs"]] == ["car0", "car1", "car2"]
        for output, (label, _) in zip(answer["outputs"], photos, strict=True):
            top5 = output["data"]
            assert len(top5) == 5 and top5[0]["probability"] >= top5[-1]["probability"]
            assert label.replace("/", "-") in [p["class_name"].replace("/", "-") for p in top5]  # training photos
    finally:
        server.stop()


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
