"""Model versions over TorchServe's management API: register, list, predict, set-default,
roll back, unregister, scale.

    versions register resnet50_cars resnet50_cars_v2.0.mar
    versions list resnet50_cars
    versions predict resnet50_cars car.jpg --version 2.0
    versions set-default resnet50_cars 2.0
    versions rollback resnet50_cars          # default -> the next lower version
    versions unregister resnet50_cars 2.0
    versions scale resnet50_cars --workers 2

Archives are registered by file name from the server's model store: TorchServe's allowed_urls
(config.properties) refuses remote URLs, and this tool never sends one.

Every command but `predict` uses the management API and its key (--management_token or
$TS_MANAGEMENT_TOKEN); `predict` uses the inference API and its key (--token or $TS_INFERENCE_TOKEN).

Exit status: 0 done; 2 a usage problem (an archive path or URL, a missing image); 3 TorchServe
not reachable (or refused the token); 4 TorchServe answered with an error (unknown model or
version, ...), or nothing to roll back to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carmodel.errors import EXIT_USAGE, exit_with
from client import MANAGEMENT_TOKEN_ENV, add_server_arguments, server_client
from serving.client import TorchServeClient, TorchServeError, version_key


def register(client: TorchServeClient, model: str, archive: str, workers: int = 1, set_default: bool = False) -> dict:
    """Register a .mar from the model store as a version of `model`; optionally make it the default."""
    result = client.register(model, archive, workers)
    if set_default:
        client.set_default(model, archive_version(client, model, archive))
    return result


def archive_version(client: TorchServeClient, model: str, archive: str) -> str:
    for row in client.versions(model):
        if row["archive"] == archive:
            return row["version"]
    raise TorchServeError(f"{archive} is not registered under {model}")


def rollback(client: TorchServeClient, model: str) -> str:
    """Make the next lower registered version the default; returns it."""
    versions = [row["version"] for row in client.versions(model)]
    current = client.default_version(model)
    lower = [v for v in versions if version_key(v) < version_key(current)]
    if not lower:
        raise TorchServeError(f"{model} {current} is the oldest registered version: nothing to roll back to")
    client.set_default(model, lower[-1])
    return lower[-1]


def predict(client: TorchServeClient, model: str, image: Path, version: str | None = None, topk: int | None = None):
    if not image.is_file():
        raise TorchServeError(f"image not found: {image}", EXIT_USAGE)
    return client.top_k(model, image.read_bytes(), version, topk)


def print_versions(model: str, rows: list[dict]) -> None:
    print(f"{model}:")
    for row in rows:
        marker = "*" if row["default"] else " "
        print(f" {marker} {row['version']:<10} workers={','.join(row['workers']) or '-':<16} {row['archive']}")
    print("  (* = default version)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(p, management="required")
    sub = p.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="register a .mar from the model store as a new version")
    reg.add_argument("model")
    reg.add_argument("archive", help="file name in the server's model store, e.g. resnet50_cars_v2.0.mar")
    reg.add_argument("--workers", type=int, default=1)
    reg.add_argument("--set_default", action="store_true")
    sub.add_parser("list", help="versions with worker status").add_argument("model")
    pred = sub.add_parser("predict", help="predict with a given version")
    pred.add_argument("model")
    pred.add_argument("image", type=Path)
    pred.add_argument("--version")
    pred.add_argument("--topk", type=int)
    sd = sub.add_parser("set-default", help="route /predictions/<model> to this version")
    sd.add_argument("model")
    sd.add_argument("version")
    sub.add_parser("rollback", help="make the next lower version the default").add_argument("model")
    un = sub.add_parser("unregister", help="remove a version")
    un.add_argument("model")
    un.add_argument("version")
    sc = sub.add_parser("scale", help="set the number of workers")
    sc.add_argument("model")
    sc.add_argument("--workers", type=int, required=True)
    sc.add_argument("--version")
    return p.parse_args(argv)


def run(client: TorchServeClient, args: argparse.Namespace) -> None:
    if args.command == "register":
        print(register(client, args.model, args.archive, args.workers, args.set_default).get("status", "registered"))
    elif args.command == "list":
        print_versions(args.model, client.versions(args.model))
    elif args.command == "predict":
        print(json.dumps(predict(client, args.model, args.image, args.version, args.topk), indent=1))
    elif args.command == "set-default":
        print(client.set_default(args.model, args.version).get("status"))
    elif args.command == "rollback":
        print(f"{args.model}: default is now {rollback(client, args.model)}")
    elif args.command == "unregister":
        print(client.unregister(args.model, args.version).get("status"))
    elif args.command == "scale":
        print(client.scale(args.model, args.workers, args.version).get("status"))


def main(argv=None) -> int:
    args = parse_args(argv)
    with server_client(args) as client:
        if args.token and args.command != "predict" and not client.management_token:
            # Until the clients were made consistent, this tool's --token was the management key.
            print(
                f"note: --token is the inference key (as in predict-dir and explain); `{args.command}` uses the "
                f"management API: give its key as --management_token or ${MANAGEMENT_TOKEN_ENV}",
                file=sys.stderr,
            )
        try:
            run(client, args)
        except TorchServeError as err:
            return exit_with(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
