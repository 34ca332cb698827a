"""TorchServe instances for the benchmark, on loopback and free ports, one at a time.

Both run through serving.torchserve.Server (the lifecycle `serve` uses):

* ours:  the default profile, this project's config.properties, rendered as `make serve` does.
* stock: `Server(properties=stock_properties(ports))`: a TorchServe configuration with nothing beyond the
  addresses (all on 127.0.0.1, free ports), the model store and token auth off (as in our default
  profile): workers, batching, queue sizes and timeouts are TorchServe's defaults.

What is served is asked of TorchServe over its APIs (serving.client.TorchServeClient), never read
from its logs: worker count and batching from the management API, the engine from our handler's
own description (`GET /models/<name>?customized=true`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from bench.common import BenchError
from serving.client import TorchServeClient, TorchServeError
from serving.torchserve import ADDRESS_KEYS, ServeError, Server, free_ports

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 300
STOCK_ENGINE = "torch fp32"  # BaseHandler: the eager model, as loaded; it has no description of its own
SETUPS = ("stock", "ours")


def stock_properties(ports: dict[str, int]) -> dict[str, str]:
    """TorchServe defaults: only the addresses and token auth (the model store is Server's)."""
    return {
        **{key: f"http://{LOOPBACK}:{ports[api]}" for api, key in ADDRESS_KEYS.items()},
        "grpc_inference_address": LOOPBACK,
        "grpc_management_address": LOOPBACK,
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "disable_token_authorization": "true",
    }


def make_server(setup: str, run_dir: Path, store: Path) -> Server:
    ports = free_ports()
    if setup == "stock":
        return Server(run_dir=run_dir, model_store=store, properties=stock_properties(ports))
    return Server(run_dir=run_dir, model_store=store, ports=ports)


@dataclass
class ServedModel:
    server: Server
    name: str
    setup: str

    @cached_property
    def client(self) -> TorchServeClient:
        return self.server.client()

    @property
    def predict_url(self) -> str:
        return self.client.prediction_url(self.name)

    def description(self) -> dict | None:
        """Our handler's description of itself (engine, eval_size, pid, settings); None from the stock handler."""
        try:
            return self.client.handler_description(self.name)
        except TorchServeError:  # the stock handler may answer the describe call with an error
            return None

    def engine(self) -> str | None:
        """How the worker runs the forward pass, as the handler describes it; the stock handler runs eager fp32."""
        description = self.description() or {}
        if description.get("backend"):
            return f"{description['backend']} {description['precision']}"
        return STOCK_ENGINE if self.setup == "stock" else None

    def settings(self) -> dict:
        """What TorchServe reports for the model: worker count, pids, batch size and delay."""
        try:
            info = self.client.describe(self.name)[0]
        except TorchServeError as err:
            raise BenchError(f"describing {self.name}: {err.message}") from err
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

    def frontend_pid(self) -> int:
        """TorchServe's Java front end."""
        pid = self.server.frontend_pid()
        if pid is None:
            raise BenchError(f"no pid file for the server in {self.server.run_dir}")
        return pid


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
    if setup not in SETUPS:
        raise BenchError(f"unknown setup {setup!r}: {', '.join(SETUPS)}")
    server = make_server(setup, run_dir, store)
    try:
        server.start({name: archive}, restore=False, timeout=START_TIMEOUT_S)
        yield ServedModel(server, name, setup)
    except ServeError as err:
        raise BenchError(f"{setup} server for {name}: {err}") from err
    finally:
        server.stop()
