"""config.properties at the checkout's root is TorchServe's own configuration: a plain `torchserve --start`
from the root, as TorchServe's documentation shows it (no --ts-config, no `serve`), runs with the
project's settings - every address on loopback, no URL registration, the size limits, the handler's
metrics - and the design card's `curl -T car.jpg .../predictions/efficientnet_lite0_cars` is answered.

It takes the configuration's own fixed ports (8080-8082, 7070-7071): where something already listens
there (a developer's `make serve`), the test says so and skips."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from helpers import DEFAULT, ROOT, check_error

from carmodel.images import ImageLimits
from serving.torchserve import read_properties

PROPERTIES = read_properties(ROOT / "config.properties")
PORTS = [
    *(int(PROPERTIES[f"{api}_address"].rsplit(":", 1)[1]) for api in ("inference", "management", "metrics")),
    *(int(PROPERTIES[f"grpc_{api}_port"]) for api in ("inference", "management")),
]
TORCHSERVE = str(Path(sys.executable).parent / "torchserve")
TIMEOUT = 60


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def plain_torchserve(model_store, tmp_path):
    """`torchserve --start --model-store ... --models name=archive` run from the root; only its logs and
    pid file go to a temporary folder (environment variables TorchServe reads, not configuration)."""
    busy = [port for port in PORTS if listening(port)]
    if busy:
        pytest.skip(f"ports {busy} are taken (is `make serve` running?): this test needs config.properties' own")
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),  # TorchServe's pid file
        "TEMP": str(tmp_path),  # the worker's socket
        "LOG_LOCATION": str(tmp_path / "logs"),
        "METRICS_LOCATION": str(tmp_path / "logs"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    start = [TORCHSERVE, "--start", "--model-store", str(model_store), "--models", f"{DEFAULT}={DEFAULT}_v1.0.mar"]
    with open(tmp_path / "torchserve.out", "wb") as out:  # not a pipe: the Java front end it starts keeps it open
        subprocess.run(start, cwd=ROOT, env=env, check=True, stdout=out, stderr=subprocess.STDOUT)
    base = PROPERTIES["inference_address"]
    try:
        deadline = time.monotonic() + 120
        while not _ready(f"{PROPERTIES['management_address']}/models/{DEFAULT}"):
            assert time.monotonic() < deadline, (tmp_path / "logs" / "ts_log.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base, int((tmp_path / ".model_server.pid").read_text())
    finally:
        subprocess.run([TORCHSERVE, "--stop"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ready(url: str) -> bool:
    try:
        workers = requests.get(url, timeout=5).json()[0]["workers"]
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return False
    return any(w["status"] == "READY" for w in workers)


def test_plain_torchserve_from_the_root_runs_with_the_projects_settings(plain_torchserve, photo):
    inference, pid = plain_torchserve
    # The design card's request: answered (TorchServe's default would be 400 "Token Authorization failed").
    response = requests.put(f"{inference}/predictions/{DEFAULT}", data=photo, timeout=TIMEOUT)
    assert response.status_code == 200 and len(response.json()) == 5, response.text[:300]
    # Every API, HTTP and gRPC, listens on loopback only.
    sockets = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert sorted(c.laddr.port for c in sockets) == sorted(PORTS)
    assert {c.laddr.ip.removeprefix("::ffff:") for c in sockets} == {"127.0.0.1"}  # Java's IPv4-mapped form
    # No registration from a URL (allowed_urls=^$): not even an https one.
    management = PROPERTIES["management_address"]
    refused = requests.post(f"{management}/models", params={"url": "https://example.com/x.mar"}, timeout=TIMEOUT)
    assert 400 <= refused.status_code < 500 and "url" in refused.text.lower(), refused.text
    # The size limits: past max_request_size the front end refuses; below it, the handler's own smaller limit.
    too_big = b"\xff\xd8" + bytes(int(PROPERTIES["max_request_size"]) + 1024)
    assert requests.put(f"{inference}/predictions/{DEFAULT}", data=too_big, timeout=TIMEOUT).status_code == 413
    over_handler = b"\xff\xd8" + bytes(ImageLimits().max_bytes + 1024)
    refused = check_error(requests.put(f"{inference}/predictions/{DEFAULT}", data=over_handler, timeout=TIMEOUT), 413)
    assert f"the limit is {ImageLimits().max_bytes}" in refused["message"]
    # The handler's metrics are declared (metrics_config): its counter is on the Prometheus endpoint.
    deadline = time.monotonic() + 30
    metrics = f"{PROPERTIES['metrics_address']}/metrics"
    while "car_predictions_total" not in (text := requests.get(metrics, timeout=TIMEOUT).text):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.5)
