"""Start and stop TorchServe with this project's configuration, and wait until models are READY.

serve start                      # the shipped default model, loopback only
serve start --profile hardened   # token auth on, model API off
serve start --profile container --fresh --foreground   # the Docker image's process
serve status
serve stop
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from carmodel import paths
from carmodel.errors import exit_with
from carmodel.paths import DEFAULT_MODEL
from serving.torchserve import (
    ADDRESS_KEYS,
    PROFILES,
    ServeError,
    Server,
    is_alive,
    rendered_ports,
)


def print_examples(server: Server, model: str) -> None:
    inf, mgmt, met = server.url("inference"), server.url("management"), server.url("metrics")
    auth = tokens = ""
    if server.token():
        key_file = _shown(server.run_dir / "key_file.json")
        auth = ' -H "Authorization: Bearer $TS_INFERENCE_TOKEN"'
        # The clients below read the same variables (client/__init__.py).
        tokens = (
            f"\n  export TS_INFERENCE_TOKEN=$(jq -r .inference.key {key_file})"
            f"\n  export TS_MANAGEMENT_TOKEN=$(jq -r .management.key {key_file})\n"
        )
    print(f"""
TorchServe is up; {model} is READY.
{tokens}
  curl{auth} -T car.jpg {inf}/predictions/{model}
  curl{auth} -T car.jpg -H "X-Top-K: 3" {inf}/predictions/{model}
  curl{auth} -F data=@car.jpg {inf}/predictions/{model}
  explain car.jpg --model {model} --out heatmap.png
  predict-dir path/to/images --model {model}
  versions list {model}          # management API: {mgmt}
  curl -s {met}/metrics | grep ts_inference
  gRPC: inference {server.grpc_address("inference")}, management {server.grpc_address("management")}
  demo --url {inf} --management_url {mgmt}   # a page in the browser, on 127.0.0.1:8090
  make stop
""")


def _shown(path: Path) -> Path:
    """`path` relative to the working directory when it is below it, as a user would type it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def run_foreground(server: Server, start: Callable[[], None]) -> int:
    """`start()` TorchServe and stay while it runs (a container's main process). SIGTERM or SIGINT (docker stop,
    Ctrl-C), during the start too, stops it cleanly and returns 0; TorchServe exiting on its own returns 1."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM is Ctrl-C from here on
    try:
        start()
        pid = server.frontend_pid()
        while pid is not None and is_alive(pid):
            with contextlib.suppress(ChildProcessError):  # as PID 1, TorchServe's orphaned processes are ours to reap
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            time.sleep(0.5)
    except KeyboardInterrupt:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the stop short
        print("stopping TorchServe", flush=True)
        server.stop()
        print("TorchServe stopped", flush=True)
        return 0
    print(f"error: TorchServe exited; see {server.run_dir / 'logs'}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--profile", default="default", choices=list(PROFILES))
    parser.add_argument("--model_store", default=str(paths.model_store()), help="default: ./model_store")
    parser.add_argument(
        "--model", action="append", help="name=archive.mar to load (repeatable); default: the shipped model"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the last snapshot")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--run_dir", default=str(paths.run_dir()), help="state: rendered config, logs, pid (./var/run)")
    parser.add_argument(
        "--foreground", action="store_true", help="start: stay until TorchServe exits; SIGTERM/SIGINT stop it"
    )
    parser.add_argument("--host", help="listen on this address instead of the profile's (e.g. 127.0.0.1)")
    for api in ADDRESS_KEYS:
        parser.add_argument(f"--{api}_port", type=int, help=f"default: the profile's {ADDRESS_KEYS[api]}")
    args = parser.parse_args(argv)
    ports = {api: getattr(args, f"{api}_port") for api in ADDRESS_KEYS if getattr(args, f"{api}_port")}
    if args.command != "start" and not ports:
        ports = rendered_ports(Path(args.run_dir))  # stop/status talk to the instance start rendered
    server = Server(
        run_dir=Path(args.run_dir),
        profile=args.profile,
        model_store=Path(args.model_store),
        ports=ports,
        host=args.host,
    )
    try:
        if args.command == "stop":
            server.stop()
            print("TorchServe stopped")
        elif args.command == "status":
            running = server.is_running()
            print("running" if running else "not running")
            return 0 if running else 1
        else:
            if server.is_running():
                print(f"TorchServe is already running at {server.url('inference')} (make stop first)")
                return 0
            models = dict(m.split("=", 1) for m in args.model) if args.model else None

            def start() -> None:
                why = server.start(models, restore=not args.fresh, timeout=args.timeout)
                print(f"started ({why})")
                print_examples(server, next(iter(models)) if models else DEFAULT_MODEL)
                sys.stdout.flush()

            if args.foreground:
                return run_foreground(server, start)
            start()
    except ServeError as err:
        return exit_with(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
