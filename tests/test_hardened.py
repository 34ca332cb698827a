"""The hardened profile on a real TorchServe: tokens on every API, the model API off, no token in the
logs; and the default profile's real listening sockets, all on loopback.

TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path

import psutil
import pytest
import requests
from helpers import run

from carmodel.errors import EXIT_UNREACHABLE
from serving.torchserve import Server, free_ports

MODEL = "efficientnet_lite0_cars"
ARCHIVE = f"{MODEL}_v1.0.mar"
TOKEN_REFUSED = "Token Authorization failed"
BIN = Path(sys.executable).parent  # the clients' entry points


@pytest.fixture(scope="module")
def hardened(hardened_server):
    """The session's hardened server (conftest), shared with the demo page's test."""
    return hardened_server


@pytest.fixture(scope="module")
def keys(hardened) -> dict[str, str]:
    """The keys TorchServe generated, from the key_file.json in the run dir (removed again at stop)."""
    keys = {kind: hardened.token(kind) for kind in ("inference", "management", "API")}
    assert all(keys.values()) and len(set(keys.values())) == 3, keys
    return keys


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def assert_token_refused(r: requests.Response) -> None:
    assert r.status_code in (400, 401), (r.status_code, r.text)
    assert r.json()["type"] == "InvalidKeyException" and TOKEN_REFUSED in r.json()["message"]


def _ipv4(ip: str) -> str:
    """The JVM listens on dual-stack sockets: 127.0.0.1 shows as ::ffff:127.0.0.1 (and 0.0.0.0 as ::)."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def listening(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of every inet socket in LISTEN state of `pid` and its descendants (the workers)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        (_ipv4(c.laddr.ip), c.laddr.port)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def frontend_pid(server: Server) -> int:
    pid = int((server.run_dir / "tmp" / ".model_server.pid").read_text())
    assert "org.pytorch.serve.ModelServer" in psutil.Process(pid).cmdline()
    return pid


def configured_ports(server: Server) -> set[int]:
    http = {int(server.url(api).rsplit(":", 1)[1]) for api in ("inference", "management", "metrics")}
    return http | {int(server.props[k]) for k in ("grpc_inference_port", "grpc_management_port")}


# ---------------------------------------------------------------------------- configuration


def test_hardened_profile_renders_inference_on_all_interfaces_and_the_rest_on_loopback(tmp_path):
    ports = free_ports()
    props = Server(run_dir=tmp_path, profile="hardened", ports=ports).props
    assert props["inference_address"] == f"http://0.0.0.0:{ports['inference']}"
    assert props["management_address"] == f"http://127.0.0.1:{ports['management']}"
    assert props["metrics_address"] == f"http://127.0.0.1:{ports['metrics']}"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_envvars_config"] == "false"


# ---------------------------------------------------------------------------- tokens


def test_predictions_need_the_inference_key(hardened, keys, car_image):
    url = f"{hardened.url('inference')}/predictions/{MODEL}"
    body = car_image.read_bytes()
    for token in (None, "wrong-token", keys["management"], keys["API"]):
        assert_token_refused(requests.put(url, data=body, headers=bearer(token), timeout=60))

    r = requests.put(url, data=body, headers={**bearer(keys["inference"]), "X-Top-K": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    predictions = r.json()
    assert len(predictions) == 3
    assert all(isinstance(p["class_name"], str) and 0.0 <= p["probability"] <= 1.0 for p in predictions)


def test_ping_needs_the_inference_key(hardened, keys):
    url = f"{hardened.url('inference')}/ping"
    assert_token_refused(requests.get(url, timeout=10))
    r = requests.get(url, headers=bearer(keys["inference"]), timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"
    assert hardened.is_running()  # Server.client() reads the key file for its readiness check


def test_management_needs_the_management_key(hardened, keys):
    url = f"{hardened.url('management')}/models"
    for token in (None, "wrong-token", keys["inference"]):
        assert_token_refused(requests.get(url, headers=bearer(token), timeout=10))

    r = requests.get(url, headers=bearer(keys["management"]), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["models"] == [{"modelName": MODEL, "modelUrl": ARCHIVE}]


def test_model_api_is_off_even_with_the_management_key(hardened, keys, car_image):
    mgmt = hardened.url("management")
    headers = bearer(keys["management"])
    register = requests.post(
        f"{mgmt}/models",
        params={"url": ARCHIVE, "model_name": "again", "synchronous": "true"},
        headers=headers,
        timeout=60,
    )
    delete = requests.delete(f"{mgmt}/models/{MODEL}", headers=headers, timeout=30)
    for r in (register, delete):
        assert r.status_code == 405, (r.status_code, r.text)
        assert r.json()["type"] == "MethodNotAllowedException"
        assert "method is not allowed" in r.json()["message"]
    # Without a token the same request is refused before it gets that far.
    assert_token_refused(requests.post(f"{mgmt}/models", params={"url": ARCHIVE}, timeout=30))

    # Nothing changed: still one model, still answering.
    r = requests.get(f"{mgmt}/models", headers=headers, timeout=10)
    assert r.json()["models"] == [{"modelName": MODEL, "modelUrl": ARCHIVE}]
    r = requests.put(
        f"{hardened.url('inference')}/predictions/{MODEL}",
        data=car_image.read_bytes(),
        headers=bearer(keys["inference"]),
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_versions_tool_with_the_management_key(hardened, keys):
    """`versions` against the hardened server: reads work with the management key ($TS_MANAGEMENT_TOKEN or
    --management_token), a refused key exits 3 as in every client, writes are refused (405, exit 4)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    base = [str(BIN / "versions"), "--management_url", hardened.url("management")]

    result = run([*base, "list", MODEL], env=env)
    assert result.returncode == EXIT_UNREACHABLE and TOKEN_REFUSED in result.stderr
    # The inference key is not the management key, whatever the flag; --token is the inference key.
    # KEY=VALUE form throughout: TorchServe's keys may start with "-", which argparse takes for a flag
    result = run([*base, f"--management_token={keys['inference']}", "list", MODEL], env=env)
    assert result.returncode == EXIT_UNREACHABLE and TOKEN_REFUSED in result.stderr
    result = run([*base, f"--token={keys['management']}", "list", MODEL], env=env)
    assert result.returncode == EXIT_UNREACHABLE and TOKEN_REFUSED in result.stderr
    assert "--management_token" in result.stderr  # the note for whoever used versions' old --token

    result = run([*base, "list", MODEL], env={**env, "TS_MANAGEMENT_TOKEN": keys["management"]})
    assert result.returncode == 0, result.stderr
    assert "* 1.0" in result.stdout and ARCHIVE in result.stdout
    result = run([*base, f"--management_token={keys['management']}", "list", MODEL], env=env)
    assert result.returncode == 0, result.stderr
    assert "* 1.0" in result.stdout and ARCHIVE in result.stdout

    result = run([*base, "register", MODEL, ARCHIVE], env={**env, "TS_MANAGEMENT_TOKEN": keys["management"]})
    assert result.returncode == 4
    assert "-> 405" in result.stderr and "method is not allowed" in result.stderr


def test_clients_take_the_inference_key_the_same_way(hardened, keys, car_image, tmp_path):
    """predict-dir, versions predict and explain: --token (alias --inference_token) or $TS_INFERENCE_TOKEN;
    without it, or with the wrong key, each exits 3 with TorchServe's refusal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "car.jpg").write_bytes(car_image.read_bytes())
    url = ["--url", hardened.url("inference")]
    commands = {
        "predict-dir": [str(BIN / "predict-dir"), str(photos), "--model", MODEL, *url, "--out", str(tmp_path / "p")],
        "versions": [str(BIN / "versions"), "--inference_url", hardened.url("inference"), "predict", MODEL],
        "explain": [str(BIN / "explain"), str(car_image), "--model", MODEL, *url, "--out", str(tmp_path / "e.png")],
    }
    commands["versions"].append(str(car_image))
    for name, cmd in commands.items():
        for refused in (env, {**env, "TS_INFERENCE_TOKEN": keys["management"]}):
            result = run([*cmd, "--quiet"] if name == "predict-dir" else cmd, env=refused)
            assert result.returncode == EXIT_UNREACHABLE, (name, result.stderr)
            assert TOKEN_REFUSED in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
    token = keys["inference"]
    for flag in ("--token", "--inference_token"):
        result = run([*commands["predict-dir"], f"{flag}={token}", "--quiet"], env=env)
        assert result.returncode == 0, result.stderr
    result = run(commands["versions"][:1] + [f"--token={token}"] + commands["versions"][1:], env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["class_name"]
    result = run(commands["explain"], env={**env, "TS_INFERENCE_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "e.png").is_file()


def test_tokens_never_reach_the_logs(hardened, keys, car_image):
    # Requests with right and wrong keys, so that whatever TorchServe logs per request is there.
    for token in (keys["inference"], keys["management"], "wrong-token"):
        requests.put(
            f"{hardened.url('inference')}/predictions/{MODEL}",
            data=car_image.read_bytes(),
            headers=bearer(token),
            timeout=60,
        )
        requests.get(f"{hardened.url('management')}/models", headers=bearer(token), timeout=10)

    logs = [p for p in (hardened.run_dir / "logs").rglob("*") if p.is_file()]
    logs.append(hardened.run_dir / "torchserve.out")
    names = {p.name for p in logs}
    assert {"ts_log.log", "model_log.log", "access_log.log"} <= names, names
    # The requests above are in the access log: the logs are being written, just not the keys.
    access_log = (hardened.run_dir / "logs" / "access_log.log").read_text()
    assert f"/predictions/{MODEL}" in access_log
    for path in logs:
        text = path.read_text(errors="replace")
        for kind, key in keys.items():
            assert key not in text, f"the {kind} key is in {path}"


def test_hardened_server_listens_only_where_configured(hardened):
    sockets = listening(frontend_pid(hardened))
    assert {port for _, port in sockets} == configured_ports(hardened)
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}


# ---------------------------------------------------------------------------- default profile


def test_default_profile_listens_on_loopback_only(server):
    """The session server (default profile): every listening socket of TorchServe's JVM and its
    Python workers is on 127.0.0.1 - HTTP APIs, gRPC, and nothing else."""
    sockets = listening(frontend_pid(server))
    assert {port for _, port in sockets} == configured_ports(server)
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets


def test_worker_sockets_are_private_to_the_instance(server):
    """TorchServe puts worker sockets in Java's temp dir, /tmp/.ts.sock.<9000+n> unless told otherwise:
    every instance would use the same paths. serve.py points it at the instance's run_dir/tmp."""
    workers = psutil.Process(frontend_pid(server)).children(recursive=True)
    paths = {c.laddr for w in workers for c in w.net_connections(kind="unix") if c.laddr}
    assert len(paths) >= 2, paths  # one worker per model, both models
    assert all(Path(p).parent == server.run_dir / "tmp" and Path(p).name.startswith(".ts.sock.") for p in paths), paths
