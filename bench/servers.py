"""TorchServe instances for the benchmark, on loopback and free ports, one at a time.

* ours:  scripts.serve.Server - this project's config.properties, rendered as `make serve` does.
* stock: the same lifecycle code, but a config.properties with nothing beyond the addresses (all
  on 127.0.0.1, free ports), the model store and token auth off (as in our default profile):
  workers, batching, queue sizes and timeouts are TorchServe's defaults.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.common import BenchError
from scripts.serve import ADDRESS_KEYS, ServeError, Server, free_ports

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 300
MANAGEMENT_TIMEOUT_S = 10
STOCK_ENGINE = "torch fp32"  # BaseHandler: the eager model, as loaded
ENGINE_LOG = re.compile(r"backend=(\S+) precision=(\S+)")  # our handler's "ready: ..." line


class StockServer(Server):
    """TorchServe defaults: only addresses, the model store and token auth are set."""

    def _render_props(self) -> dict[str, str]:
        if not self.ports:
            raise BenchError("StockServer needs explicit ports (free_ports())")
        props = {key: f"http://{LOOPBACK}:{self.ports[api]}" for api, key in ADDRESS_KEYS.items()}
        return {
            **props,
            "grpc_inference_address": LOOPBACK,
            "grpc_management_address": LOOPBACK,
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store),
            "disable_token_authorization": "true",
        }


SERVER_CLASSES = {"stock": StockServer, "ours": Server}


@dataclass
class ServedModel:
    server: Server
    name: str

    @property
    def predict_url(self) -> str:
        return f"{self.server.url('inference')}/predictions/{self.name}"

    def engine(self) -> str | None:
        """How the worker runs the forward pass: stock is eager torch; ours logs it when ready."""
        if isinstance(self.server, StockServer):
            return STOCK_ENGINE
        log = self.server.run_dir / "logs" / "model_log.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        match = ENGINE_LOG.search(text)
        if match:
            return f"{match.group(1)} {match.group(2)}"
        return STOCK_ENGINE if " ready: arch=" in text else None  # a handler without a fast path

    def settings(self) -> dict:
        """What TorchServe reports for the model: worker count, batch size and delay."""
        r = requests.get(
            f"{self.server.url('management')}/models/{self.name}",
            headers=self.server.headers("management"),
            timeout=MANAGEMENT_TIMEOUT_S,
        )
        r.raise_for_status()
        info = r.json()[0]
        pids = [w.get("pid") for w in info.get("workers", []) if w.get("pid")]
        return {
            "workers": len(info.get("workers", [])),
            "worker_pids": pids,
            "worker_omp_num_threads": worker_env(pids[0], "OMP_NUM_THREADS") if pids else None,
            "batch_size": info.get("batchSize"),
            "max_batch_delay_ms": info.get("maxBatchDelay"),
            "min_workers": info.get("minWorkers"),
            "max_workers": info.get("maxWorkers"),
        }


def worker_env(pid: int, key: str) -> str | None:
    """An environment variable of a worker process (how many threads torch was told to use)."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)
    return values.get(key)


@contextlib.contextmanager
def serving(setup: str, run_dir: Path, store: Path, name: str, archive: str):
    """Start TorchServe with one model, yield a ServedModel, always stop it."""
    server = SERVER_CLASSES[setup](run_dir=run_dir, model_store=store, ports=free_ports())
    try:
        server.start({name: archive}, restore=False, timeout=START_TIMEOUT_S)
        yield ServedModel(server, name)
    except ServeError as err:
        raise BenchError(f"{setup} server for {name}: {err}") from err
    finally:
        server.stop()
