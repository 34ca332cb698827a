"""`versions` (client/versions.py) end to end: two real ResNet-50 exports (different seeds) as versions
1.0 and 2.0 of resnet50_cars on a real TorchServe, driven through TorchServeClient's management API
(serving/client.py), the tool's own operations (rollback, register --set_default) and the CLI.

The tests of the flow run in file order and share one server (module scope): register 2.0, list,
predict each version against its own export computed in-process, set-default, roll back,
unregister, scale. The error cases come first and must leave the server as they found it.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests
import torch
import torch.nn.functional as F
import yaml
from helpers import python, run, start_server

from carmodel.errors import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE
from carmodel.export import ExportDir
from carmodel.images import ImageLimits, decode_image
from carmodel.presets import decode_side, eval_preset
from client import versions
from serving.client import TorchServeClient, TorchServeError
from serving.torchserve import free_ports

pytestmark = pytest.mark.server  # a TorchServe of its own, whose versions change

MODEL = "resnet50_cars"
V1, V2 = "1.0", "2.0"
MAR = {V1: "resnet50_cars_v1.0.mar", V2: "resnet50_cars_v2.0.mar"}
TOPK = 5
# Server (archives built for eager fp32) and in-process run the same path: only summation order
# (thread count, ~1e-6) and the handler's rounding to 6 decimals may differ. For scale: a centre
# crop instead of the preset's squash, or nearest-neighbour resizing, moves these smoke models'
# top-5 probabilities by ~0.1.
PROB_ATOL = 1e-3
VERSIONS = str(Path(sys.executable).parent / "versions")  # the entry point users run


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def resnet50_v2_export(tmp_path_factory, resnet50_export) -> Path:
    """A second version of the session's ResNet-50 export, saved through the export's own contract: its
    network with the classifier's rows turned round by one class, so that each class scores what its
    neighbour did (another model, without a second training run)."""
    export = ExportDir(resnet50_export)
    model = export.load_model("cpu")
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.copy_(classifier.weight.roll(1, 0))
        classifier.bias.copy_(classifier.bias.roll(1, 0))
    v2 = tmp_path_factory.mktemp("resnet50_v2") / "export"
    shutil.copytree(resnet50_export, v2)
    ExportDir(v2).save(model, export.classes(), export.model_config)
    return v2


@pytest.fixture(scope="module")
def exports(resnet50_export, resnet50_v2_export) -> dict[str, Path]:
    return {V1: resnet50_export, V2: resnet50_v2_export}


@pytest.fixture(scope="module")
def versions_store(tmp_path_factory, exports) -> Path:
    """Both versions side by side in one store, archived for the eager fp32 path: the path the
    in-process reference takes (the default, precision auto, may serve bf16 where the CPU has it)."""
    store = tmp_path_factory.mktemp("versions_store")
    for version, export in exports.items():
        result = python(
            "-m",
            "serving.archive",
            *("--export", str(export), "--model_store", str(store), "--version", version),
            *("--backend", "torch", "--precision", "fp32"),
        )
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in store.iterdir()) == [MAR[V1], MAR[V2]]
    for version, mar in MAR.items():
        with zipfile.ZipFile(store / mar) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
            handler_settings = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
        assert manifest["model"]["modelVersion"] == version
        assert (handler_settings["backend"], handler_settings["precision"]) == ("torch", "fp32")
    return store


@pytest.fixture(scope="module")
def vserver(tmp_path_factory, versions_store):
    """A TorchServe of its own (the flow changes what it serves), starting with only v1.0."""
    srv = start_server(tmp_path_factory.mktemp("versions_ts"), versions_store, {MODEL: MAR[V1]})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mv(vserver) -> TorchServeClient:
    with vserver.client() as client:
        yield client


@pytest.fixture(scope="module")
def image(car_images) -> Path:
    return next(iter(car_images.values()))


@pytest.fixture(scope="module")
def reference(exports, image) -> dict[str, torch.Tensor]:
    """Each export's class probabilities for `image`, in-process, as the handler computes them:
    the same decoder (shrinking to the export's decode side), the export's eval preset, fp32, channels_last."""
    probs = {}
    for version, export in exports.items():
        export_dir = ExportDir(export)
        pil = decode_image(image.read_bytes(), ImageLimits(), decode_side(export_dir.model_config))
        model = export_dir.load_model("cpu").to(memory_format=torch.channels_last)
        batch = eval_preset(export_dir.model_config)(pil).unsqueeze(0).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs[version] = F.softmax(model(batch).float(), dim=1)[0]
    return probs


# ---------------------------------------------------------------------------- helpers


def cli(server, *args: str):
    env = {k: v for k, v in os.environ.items() if k not in ("TS_MANAGEMENT_TOKEN", "TS_INFERENCE_TOKEN")}
    return run(
        [VERSIONS, "--management_url", server.url("management"), "--inference_url", server.url("inference"), *args],
        env=env,
    )


def predict_http(server, image: Path, version: str | None = None) -> requests.Response:
    path = f"/predictions/{MODEL}/{version}" if version else f"/predictions/{MODEL}"
    return requests.put(
        f"{server.url('inference')}{path}", data=image.read_bytes(), headers={"X-Top-K": str(TOPK)}, timeout=60
    )


def assert_matches(served: list[dict], probs: torch.Tensor, k: int = TOPK) -> None:
    """A served top-k equals the in-process top-k of `probs`: classes, order and probabilities."""
    assert len(served) == k
    served_ids = [p["class_id"] for p in served]
    for p in served:
        assert p["probability"] == pytest.approx(float(probs[p["class_id"]]), abs=PROB_ATOL), served
    assert [p["probability"] for p in served] == sorted((p["probability"] for p in served), reverse=True)
    ref_p, ref_ids = (t.tolist() for t in torch.topk(probs, k + 1))
    # Top-1 and the top-k set must agree, unless the reference itself is tied within the tolerance.
    tied_top1 = [c for c, q in zip(ref_ids, ref_p, strict=True) if ref_p[0] - q < PROB_ATOL]
    assert served_ids[0] in tied_top1, (served_ids, ref_ids, ref_p)
    if ref_p[k - 1] - ref_p[k] > PROB_ATOL:
        assert set(served_ids) == set(ref_ids[:k]), (served_ids, ref_ids, ref_p)


def rows(mv) -> list[tuple[str, bool, str]]:
    return [(r["version"], r["default"], r["archive"]) for r in mv.versions(MODEL)]


def listed(stdout: str) -> dict[str, str]:
    """`versions list` output -> {version: line}, with '*' lines marking the default."""
    lines = [line for line in stdout.splitlines()[1:] if line.strip() and not line.strip().startswith("(")]
    return {line[3:].split()[0]: line for line in lines}


# ---------------------------------------------------------------------------- errors first


def test_starts_with_only_v1_as_default(mv, vserver):
    assert rows(mv) == [(V1, True, MAR[V1])]
    assert mv.versions(MODEL)[0]["workers"] == ["READY"]
    result = cli(vserver, "list", MODEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{MODEL}:\n")
    entries = listed(result.stdout)
    assert list(entries) == [V1]
    assert entries[V1].startswith(" * ") and "workers=READY" in entries[V1] and MAR[V1] in entries[V1]


def test_unreachable_management_url_exits_3(vserver):
    port = free_ports()["management"]  # bound and released: nothing listens there
    with pytest.raises(TorchServeError) as err:
        TorchServeClient(management_url=f"http://127.0.0.1:{port}", timeout=5).versions(MODEL)
    assert err.value.exit_code == EXIT_UNREACHABLE == 3
    assert f"not reachable at http://127.0.0.1:{port}" in str(err.value)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    result = run([VERSIONS, "--management_url", f"http://127.0.0.1:{port}", "list", MODEL], env=env)
    assert result.returncode == 3
    # The same words as predict-dir and explain: one client (serving/client.py) says it.
    assert result.stderr.strip() == f"error: TorchServe not reachable at http://127.0.0.1:{port}"
    assert "Traceback" not in result.stderr


def test_server_that_never_answers_is_a_clear_error_not_a_traceback():
    with socket.socket() as listener:  # accepts connections (backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(TorchServeError) as err:
            TorchServeClient(management_url=f"http://127.0.0.1:{port}", timeout=1).versions(MODEL)
    assert err.value.exit_code == EXIT_SERVER == 4
    assert "no answer within 1 s" in str(err.value)


def test_management_url_without_scheme_exits_2():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    result = run([VERSIONS, "--management_url", "127.0.0.1:8081", "list", MODEL], env=env)
    assert result.returncode == EXIT_USAGE == 2
    assert result.stderr.startswith("error: not a usable URL: 127.0.0.1:8081/models/")
    assert "Traceback" not in result.stderr


def test_predict_with_a_missing_image_exits_2(vserver, tmp_path):
    result = cli(vserver, "predict", MODEL, str(tmp_path / "nope.jpg"))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == f"error: image not found: {tmp_path / 'nope.jpg'}"


def test_archive_not_in_store_is_refused_with_exit_4(mv, vserver):
    with pytest.raises(TorchServeError) as err:
        mv.register(MODEL, "resnet50_cars_v9.9.mar")
    assert err.value.exit_code == 4 and err.value.status == 404
    assert "404" in str(err.value) and "resnet50_cars_v9.9.mar" in str(err.value)

    result = cli(vserver, "register", MODEL, "resnet50_cars_v9.9.mar")
    assert result.returncode == 4
    assert result.stderr.startswith("error: POST ") and "-> 404" in result.stderr
    assert "resnet50_cars_v9.9.mar" in result.stderr and "Traceback" not in result.stderr
    assert rows(mv) == [(V1, True, MAR[V1])]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Serves the real v2.0 archive to anyone who asks, and remembers who asked."""

    seen: list[str] = []
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def archive_host(versions_store):
    _Recorder.seen = []
    _Recorder.body = (versions_store / MAR[V2]).read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_urls_and_paths_are_never_sent(mv, vserver, versions_store, archive_host):
    url = f"{archive_host}/{MAR[V2]}"
    refused = [url, url.replace("http:", "https:"), f"file://{versions_store / MAR[V2]}", f"../{MAR[V2]}", "x.zip"]
    for archive in refused:
        with pytest.raises(TorchServeError) as err:
            mv.register(MODEL, archive)
        assert err.value.exit_code == 2 and "not a path or URL" in str(err.value), archive
    result = cli(vserver, "register", MODEL, url)
    assert result.returncode == 2
    assert "give the file name of a .mar in the model store" in result.stderr

    # And the server's own guard (allowed_urls), for whoever goes around the tool: refused unfetched.
    r = requests.post(
        f"{vserver.url('management')}/models",
        params={"url": url, "model_name": MODEL, "synchronous": "true"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert "does not match any allowed URL" in r.json()["message"]
    assert _Recorder.seen == []
    assert rows(mv) == [(V1, True, MAR[V1])]


# ---------------------------------------------------------------------------- the flow


def test_register_v2_from_the_store_by_file_name(mv, vserver):
    result = mv.register(MODEL, MAR[V2])
    assert "status" in result
    assert rows(mv) == [(V1, True, MAR[V1]), (V2, False, MAR[V2])]
    assert all(r["workers"] == ["READY"] for r in mv.versions(MODEL))
    assert mv.default_version(MODEL) == V1

    result = cli(vserver, "list", MODEL)
    assert result.returncode == 0, result.stderr
    entries = listed(result.stdout)
    assert list(entries) == [V1, V2]
    assert entries[V1].startswith(" * ") and entries[V2].startswith("   ")
    assert all("workers=READY" in line for line in entries.values())
    assert MAR[V2] in entries[V2]


def test_each_version_predicts_what_its_export_predicts(mv, vserver, image, reference):
    served = {}
    for version in (V1, V2):
        r = predict_http(vserver, image, version)
        assert r.status_code == 200, r.text
        served[version] = r.json()
        assert_matches(served[version], reference[version])
        # The Python API and the CLI get the same answer over the same route.
        assert mv.top_k(MODEL, image.read_bytes(), version, TOPK) == served[version]
    result = cli(vserver, "predict", MODEL, str(image), "--version", V2, "--topk", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == served[V2][:3]

    # Two different models: the versions really are two.
    assert (reference[V1] - reference[V2]).abs().max() > 10 * PROB_ATOL
    assert served[V1] != served[V2]
    # Unversioned goes to the default, still 1.0.
    assert_matches(mv.top_k(MODEL, image.read_bytes(), topk=TOPK), reference[V1])


def test_set_default_routes_unversioned_predictions_to_v2(mv, vserver, image, reference):
    result = cli(vserver, "set-default", MODEL, V2)
    assert result.returncode == 0, result.stderr
    assert "Default version successfully updated" in result.stdout
    assert mv.default_version(MODEL) == V2
    assert [r for r in rows(mv) if r[1]] == [(V2, True, MAR[V2])]

    listing = cli(vserver, "list", MODEL)
    assert listing.returncode == 0, listing.stderr
    entries = listed(listing.stdout)
    assert entries[V2].startswith(" * ") and entries[V1].startswith("   ")

    r = predict_http(vserver, image)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), reference[V2])


def test_restart_brings_back_both_versions_and_the_default(mv, vserver, image, reference):
    """TorchServe stopped and started again (restore from its snapshot): 1.0 and 2.0, with 2.0 the default."""
    before = rows(mv)
    assert [v for v, default, _ in before if default] == [V2]
    vserver.stop()
    assert not vserver.is_running()
    why = vserver.start(restore=True)
    assert why.startswith("restoring "), why
    assert rows(mv) == before
    r = predict_http(vserver, image)
    assert r.status_code == 200, r.text
    assert_matches(r.json(), reference[V2])
    assert_matches(mv.top_k(MODEL, image.read_bytes(), version=V1, topk=TOPK), reference[V1])


def test_rollback_makes_v1_the_default_again(mv, vserver, image, reference):
    result = cli(vserver, "rollback", MODEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{MODEL}: default is now {V1}"
    assert mv.default_version(MODEL) == V1
    assert_matches(mv.top_k(MODEL, image.read_bytes(), topk=TOPK), reference[V1])

    # Nothing older than 1.0: a second rollback is refused and changes nothing.
    with pytest.raises(TorchServeError, match="oldest registered version") as err:
        versions.rollback(mv, MODEL)
    assert err.value.exit_code == 4
    assert mv.default_version(MODEL) == V1


def test_unregister_v2(mv, vserver, image, reference):
    result = cli(vserver, "unregister", MODEL, V2)
    assert result.returncode == 0, result.stderr
    assert rows(mv) == [(V1, True, MAR[V1])]
    listing = cli(vserver, "list", MODEL)
    assert listing.returncode == 0, listing.stderr
    assert list(listed(listing.stdout)) == [V1]

    r = predict_http(vserver, image, V2)
    assert r.status_code == 404, r.text
    result = cli(vserver, "predict", MODEL, str(image), "--version", V2)
    assert result.returncode == 4
    assert "-> 404" in result.stderr and "Traceback" not in result.stderr

    # 1.0 is untouched, by version and unversioned.
    assert_matches(predict_http(vserver, image, V1).json(), reference[V1])
    assert_matches(predict_http(vserver, image).json(), reference[V1])


def _workers(vserver) -> tuple[int, list[str]]:
    r = requests.get(f"{vserver.url('management')}/models/{MODEL}", timeout=30)
    assert r.status_code == 200, r.text
    (detail,) = r.json()
    assert detail["modelVersion"] == V1
    return detail["minWorkers"], [w["status"] for w in detail["workers"]]


def _wait_for_workers(vserver, n: int, timeout: float = 120) -> tuple[int, list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        min_workers, statuses = _workers(vserver)
        if (min_workers, statuses) == (n, ["READY"] * n) or time.monotonic() > deadline:
            return min_workers, statuses
        time.sleep(0.5)


def test_scale_to_two_workers_and_back(mv, vserver, image, reference):
    result = cli(vserver, "scale", MODEL, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert _wait_for_workers(vserver, 2) == (2, ["READY", "READY"])
    assert mv.versions(MODEL)[0]["workers"] == ["READY", "READY"]
    assert_matches(predict_http(vserver, image).json(), reference[V1])

    mv.scale(MODEL, 1)
    assert _wait_for_workers(vserver, 1) == (1, ["READY"])
    assert_matches(predict_http(vserver, image).json(), reference[V1])
