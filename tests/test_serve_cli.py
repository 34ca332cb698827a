"""`serve` (serving/serve.py) as `make serve` / `make stop` run it: start, status, restart from the snapshot,
and a stale snapshot (its archive deleted) set aside instead of resurrecting the model."""

from __future__ import annotations

import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import requests
from helpers import run

from serving.torchserve import free_ports

pytestmark = pytest.mark.server  # every test starts `serve`'s own TorchServe

SERVE = str(Path(sys.executable).parent / "serve")  # the entry point users (and the Makefile) run

DEFAULT = "efficientnet_lite0_cars"


@pytest.fixture
def cli(tmp_path, model_store):
    store = tmp_path / "model_store"
    store.mkdir()
    for mar in (f"{DEFAULT}_v1.0.mar", "resnet50_cars_v1.0.mar"):
        shutil.copy(model_store / mar, store / mar)
    ports = free_ports()
    flags = [
        "--model_store", str(store), "--run_dir", str(tmp_path / "run"),
        "--inference_port", str(ports["inference"]), "--management_port", str(ports["management"]),
        "--metrics_port", str(ports["metrics"]),
    ]  # fmt: skip

    def serve(command: str, *extra: str):
        return run([SERVE, command, *flags, *extra], timeout=300)

    serve.store, serve.ports, serve.run_dir = store, ports, tmp_path / "run"
    yield serve
    serve("stop")


def models(cli) -> set[str]:
    r = requests.get(f"http://127.0.0.1:{cli.ports['management']}/models", timeout=10)
    return {m["modelName"] for m in r.json()["models"]}


def test_start_status_restart_and_stale_snapshot(cli):
    started = cli("start")
    assert started.returncode == 0, started.stderr
    inference = f"http://127.0.0.1:{cli.ports['inference']}"
    assert f"{DEFAULT} is READY" in started.stdout
    assert f"curl -T car.jpg {inference}/predictions/{DEFAULT}" in started.stdout
    # with --*_port flags gRPC moves to free ports too: the output says where, and they listen
    grpc_addresses = re.search(r"gRPC: inference (\S+):(\d+), management (\S+):(\d+)", started.stdout)
    assert grpc_addresses, started.stdout
    for host, port in (grpc_addresses.group(1, 2), grpc_addresses.group(3, 4)):
        socket.create_connection((host, int(port)), timeout=10).close()
    assert cli("status").stdout.strip() == "running"
    assert cli("start").stdout.startswith("TorchServe is already running")

    # A model registered at run time comes back after a restart (TorchServe's snapshot)...
    r = requests.post(
        f"http://127.0.0.1:{cli.ports['management']}/models",
        params={"url": "resnet50_cars_v1.0.mar", "initial_workers": 1, "synchronous": "true"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert cli("stop").returncode == 0
    status = cli("status")
    assert status.returncode == 1 and status.stdout.strip() == "not running"

    restarted = cli("start")
    assert restarted.returncode == 0, restarted.stderr
    assert "started (restoring" in restarted.stdout
    assert models(cli) == {DEFAULT, "resnet50_cars"}

    # ...but not once its archive is gone: the snapshot is set aside and the default model loads.
    assert cli("stop").returncode == 0
    (cli.store / "resnet50_cars_v1.0.mar").unlink()
    fresh = cli("start")
    assert fresh.returncode == 0, fresh.stderr
    assert "no longer in the model store: resnet50_cars_v1.0.mar" in fresh.stdout
    assert models(cli) == {DEFAULT}
    assert list((cli.run_dir / "logs").glob("config.stale-*"))


def test_missing_archive_is_a_clear_error(cli):
    (cli.store / f"{DEFAULT}_v1.0.mar").unlink()
    result = cli("start", "--fresh")
    assert result.returncode == 2
    assert "archive not found" in result.stderr and "make archive" in result.stderr
