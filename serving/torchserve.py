"""One TorchServe instance: its rendered .properties, its state folder, start/stop, readiness.

The library behind `serve` (serving/serve.py), the tests and the benchmarks. Every HTTP request
(readiness, load errors) goes through `Server.client()`, a serving.client.TorchServeClient with
this instance's addresses and keys.
The configuration is the project's config.properties (carmodel.paths.config_properties: the
checkout's root, or $CAR_CLASSIFIER_HOME) with a profile's overlay (PROFILES) on top. State lives
under ``var/run/`` of the working directory by default (carmodel.paths): rendered config, logs, pid
file, snapshots. On start, the last snapshot (models, versions, default versions)
is restored only if every archive it names is still in the model store; a stale snapshot is moved
aside and the default model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import handler
from carmodel import paths
from carmodel.paths import DEFAULT_ARCHIVE, DEFAULT_MODEL
from serving.client import TorchServeClient

# The handler's metrics, declared for TorchServe: package data of the handler that serves.
HANDLER_METRICS = Path(handler.__file__).with_name("metrics.yaml")

# Each profile: the keys it changes in the base, config.properties (docs/configuration.md,
# docs/security.md); None drops a key.
PROFILES: dict[str, dict[str, str | None]] = {
    "default": {},  # `make serve`: the base as it is, every API on loopback, no tokens
    # Inference beyond this host: tokens on every API, no model API; management and metrics stay on loopback.
    "hardened": {
        "inference_address": "http://0.0.0.0:8080",
        "enable_model_api": "false",
        "disable_token_authorization": "false",
    },
    # The Docker image: the container's own loopback cannot be published, and its models are baked in.
    "container": {
        "inference_address": "http://0.0.0.0:8080",
        "management_address": "http://0.0.0.0:8081",
        "metrics_address": "http://0.0.0.0:8082",
        "enable_model_api": "false",
    },
}
# KServe's TorchServe runtime (serving/kserve.py adds the envelope and the model snapshot). Its wrapper
# takes the public traffic on the pod's 8080 (HTTP) and 8081 (gRPC), hard-coded, and forwards to
# TorchServe's inference API on 8085; management stays on the pod's loopback, metrics leave it for
# Prometheus. KServe mounts the storage at /mnt/models; the pod network is the perimeter (KServe/Istio
# authenticate), and the runtime sets TS_SERVICE_ENVELOPE from the environment, which must be allowed.
KSERVE: dict[str, str | None] = {
    "inference_address": "http://0.0.0.0:8085",
    "management_address": "http://127.0.0.1:8084",
    "metrics_address": "http://0.0.0.0:8082",
    "enable_metrics_api": "true",
    "number_of_netty_threads": "4",
    "model_store": "/mnt/models/model-store",
    "enable_model_api": "false",
    "enable_envvars_config": "true",
    "metrics_config": None,  # TorchServe's own metrics there: the layout carries no handler/ folder
}
ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
MIN_JAVA = 17


class ServeError(RuntimeError):
    pass


def base_properties() -> Path:
    """config.properties, where TorchServe itself would read it: the project's root."""
    path = paths.config_properties()
    if not path.is_file():
        raise ServeError(f"{path} not found: run from the project's root (or set ${paths.HOME_ENV} to it)")
    return path


def profile_properties(profile: str) -> dict[str, str]:
    """The base with `profile`'s overlay (PROFILES) on top."""
    if profile not in PROFILES:
        raise ServeError(f"unknown profile {profile!r}: {', '.join(PROFILES)}")
    return overlaid(PROFILES[profile])


def overlaid(overlay: dict[str, str | None]) -> dict[str, str]:
    """The base config.properties with `overlay`'s keys set (None: removed); relative paths as they are."""
    props = {**read_properties(base_properties()), **overlay}
    return {key: value for key, value in props.items() if value is not None}


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def unescape_property(value: str) -> str:
    """Java .properties escapes (TorchServe writes its snapshot JSON with `\\n`, `\\:`)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(m[1], m[1]), value)


def snapshot_models(snapshot: Path) -> dict:
    """{model: {version: {marName, defaultVersion, ...}}} from a TorchServe snapshot file."""
    model_json = unescape_property(read_properties(snapshot).get("model_snapshot", "{}"))
    return json.loads(model_json).get("models", {})


def write_properties(props: dict[str, str], path: Path) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def check_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise ServeError(
            f"TorchServe needs Java {MIN_JAVA}+ and no `java` is on PATH. "
            "Install it: sudo apt-get install -y openjdk-17-jre-headless (or `make env`, which does it as root)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if not match or int(match.group(1)) < MIN_JAVA:
        raise ServeError(f"TorchServe needs Java {MIN_JAVA}+, found: {out.splitlines()[0] if out else 'unknown'}")
    return out.splitlines()[0]


@dataclass
class Server:
    """One TorchServe instance: its rendered config, its state folder, its addresses."""

    run_dir: Path = field(default_factory=paths.run_dir)
    profile: str = "default"
    model_store: Path = field(default_factory=paths.model_store)
    ports: dict[str, int] | None = None  # {"inference": 8080, ...}: tests pass free ports
    overrides: dict[str, str] = field(default_factory=dict)
    config: Path | None = None  # a whole .properties of its own instead of base + profile (deploy/kserve)
    host: str | None = None  # listen here instead of the config's host (scheme and ports stay)
    # Complete properties, used as they are (bench's stock TorchServe); only model_store is set here.
    properties: dict[str, str] | None = None

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()
        self.model_store = Path(self.model_store).resolve()
        self.config_path = self.run_dir / "config.properties"
        self.props = self._render_props()

    # -------------------------------------------------------------- configuration

    def _render_props(self) -> dict[str, str]:
        if self.properties is not None:
            return {**self.properties, "model_store": str(self.model_store), **self.overrides}
        props = read_properties(Path(self.config)) if self.config else profile_properties(self.profile)
        props["model_store"] = str(self.model_store)
        if "metrics_config" in props:  # the installed handler's declaration (a checkout's, or site-packages')
            props["metrics_config"] = str(HANDLER_METRICS)
        for name, key in ADDRESS_KEYS.items():
            scheme_host, port = props[key].rsplit(":", 1)
            if self.host:
                scheme_host = f"{scheme_host.split('//', 1)[0]}//{self.host}"
            props[key] = f"{scheme_host}:{(self.ports or {}).get(name, port)}"
        if self.ports:  # tests: keep gRPC off the fixed ports too
            props["grpc_inference_port"] = str(self.ports.get("grpc_inference") or free_port())
            props["grpc_management_port"] = str(self.ports.get("grpc_management") or free_port())
        props.update(self.overrides)
        return props

    def url(self, api: str) -> str:
        return self.props[ADDRESS_KEYS[api]]

    def grpc_address(self, api: str) -> str:
        """host:port of TorchServe's gRPC `api` ("inference" or "management")."""
        host = self.props.get(f"grpc_{api}_address", "127.0.0.1")
        port = self.props.get(f"grpc_{api}_port", GRPC_DEFAULT_PORTS[api])
        return f"{host}:{port}"

    @property
    def env(self) -> dict[str, str]:
        tmp = self.run_dir / "tmp"
        # TorchServe's worker sockets live in Java's temp dir (TEMP -> -Djava.io.tmpdir), by default
        # /tmp/.ts.sock.<9000+n> for every instance: a second instance would take over the first's.
        # A Unix socket path must fit in 108 bytes; a deeper run_dir keeps the default.
        java_tmp = {"TEMP": str(tmp)} if len(f"{tmp}/.ts.sock.65535") < 100 else {}
        return {
            **os.environ,
            "TMPDIR": str(tmp),  # TorchServe keeps its pid file in the temp dir: one per instance
            **java_tmp,
            "LOG_LOCATION": str(self.run_dir / "logs"),
            "METRICS_LOCATION": str(self.run_dir / "logs"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    @property
    def snapshot_dir(self) -> Path:
        return self.run_dir / "logs" / "config"

    # -------------------------------------------------------------- auth

    def token(self, kind: str = "inference") -> str | None:
        """The key TorchServe generated for this instance (hardened profile), or None."""
        key_file = self.run_dir / "key_file.json"
        try:
            keys = json.loads(key_file.read_text())
        except (FileNotFoundError, ValueError):  # not there yet, or TorchServe is still writing it
            return None
        return keys[kind]["key"]

    # -------------------------------------------------------------- snapshots

    def latest_snapshot(self) -> Path | None:
        # TorchServe restores the newest of its startup/snapshot/shutdown files (timestamped names).
        snaps = sorted(self.snapshot_dir.glob("*.cfg")) if self.snapshot_dir.is_dir() else []
        return snaps[-1] if snaps else None

    def snapshot_archives(self, snapshot: Path) -> list[str]:
        models = snapshot_models(snapshot)
        return [v["marName"] for versions in models.values() for v in versions.values()]

    def usable_snapshot(self) -> tuple[Path | None, str]:
        snapshot = self.latest_snapshot()
        if snapshot is None:
            return None, "no snapshot"
        missing = [m for m in self.snapshot_archives(snapshot) if not (self.model_store / m).is_file()]
        if missing:
            return None, f"snapshot {snapshot.name} names archives no longer in the model store: {', '.join(missing)}"
        return snapshot, f"restoring {snapshot.name}"

    def _set_aside_snapshots(self) -> None:
        if self.snapshot_dir.is_dir():
            self.snapshot_dir.rename(self.snapshot_dir.with_name(f"config.stale-{time.strftime('%Y%m%d-%H%M%S')}"))

    # -------------------------------------------------------------- lifecycle

    def client(self) -> TorchServeClient:
        """A client for this instance: its addresses, and its tokens when token auth is on (read from
        the key file, which TorchServe writes anew at every start: ask again after a restart)."""
        return TorchServeClient(
            inference_url=self.url("inference"),
            management_url=self.url("management"),
            metrics_url=self.url("metrics"),
            inference_token=self.token("inference"),
            management_token=self.token("management"),
        )

    def is_running(self) -> bool:
        with self.client() as client:
            return client.ping()

    def start(self, models: dict[str, str] | None = None, restore: bool = True, timeout: float = 180) -> str:
        """Start TorchServe; `models` maps name -> archive file in the model store."""
        check_java()
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        snapshot, why = self.usable_snapshot() if restore else (None, "fresh start requested")
        # TorchServe reads its last snapshot only when started without a config file; we always
        # pass ours, so the snapshot's models (versions, defaults, workers) ride along in it.
        restored = {"model_snapshot": read_properties(snapshot)["model_snapshot"]} if snapshot else {}
        write_properties({**self.props, **restored}, self.config_path)
        cmd = ["torchserve", "--start", "--ts-config", str(self.config_path), "--model-store", str(self.model_store)]
        if snapshot is None:
            self._set_aside_snapshots()
            models = models if models is not None else {DEFAULT_MODEL: DEFAULT_ARCHIVE}
            for archive in models.values():
                if not (self.model_store / archive).is_file():
                    raise ServeError(f"archive not found: {self.model_store / archive} (build it: make archive)")
            if models:
                cmd += ["--models", *(f"{name}={archive}" for name, archive in models.items())]
        # Started from run_dir: TorchServe writes key_file.json (hardened profile) into its cwd.
        with open(self.run_dir / "torchserve.out", "ab") as log:
            result = subprocess.run(cmd, cwd=self.run_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise ServeError(
                f"torchserve --start failed (exit {result.returncode}); see {self.run_dir / 'torchserve.out'}"
            )
        expected = list(models) if snapshot is None else list(snapshot_models(snapshot))
        try:
            self.wait_ready(expected, timeout)
        except ServeError:
            self.stop()  # a failed start leaves nothing running
            raise
        return why

    def wait_ready(self, models: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.client() as client:  # a fresh one each round: the key file appears during the start
                ready = client.ping() and all(client.model_ready(m) for m in models)
                failed = {m: err for m in models if (err := client.load_error(m))} if ready else {}
            if ready:
                if failed:
                    raise ServeError(
                        "; ".join(f"{m}: {err}" for m, err in failed.items()) + f" (see {self.run_dir / 'logs'})"
                    )
                return
            time.sleep(0.5)
        raise ServeError(f"TorchServe not ready within {timeout:.0f}s; see {self.run_dir / 'logs'}")

    def load_error(self, model: str, version: str | None = None) -> str | None:
        """Why a worker could not load the model (its default version, or `version`), as the handler
        reports it; None when it loaded fine."""
        with self.client() as client:
            return client.load_error(model, version)

    def frontend_pid(self) -> int | None:
        """The Java front end's pid, from TorchServe's pid file in this instance's temp folder."""
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        return int(pid_file.read_text()) if pid_file.is_file() else None

    def stop(self, timeout: float = 60) -> None:
        pid = self.frontend_pid()
        subprocess.run(["torchserve", "--stop"], cwd=self.run_dir, env=self.env, capture_output=True)
        deadline = time.monotonic() + timeout
        while pid and is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid and is_alive(pid):
            os.kill(pid, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still "exists"; treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRPC_DEFAULT_PORTS = {"inference": "7070", "management": "7071"}  # TorchServe's own defaults


def rendered_ports(run_dir: Path) -> dict[str, int]:
    """The ports of the instance last started in `run_dir` (its rendered config), if any."""
    rendered = run_dir / "config.properties"
    if not rendered.is_file():
        return {}
    props = read_properties(rendered)
    return {api: int(props[key].rsplit(":", 1)[1]) for api, key in ADDRESS_KEYS.items() if key in props}


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference", "grpc_management")}
