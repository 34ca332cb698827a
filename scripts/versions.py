"""Model versions over TorchServe's management API: register, list, predict, set-default,
roll back, unregister, scale.

    python scripts/versions.py register resnet50_cars resnet50_cars_v2.0.mar
    python scripts/versions.py list resnet50_cars
    python scripts/versions.py predict resnet50_cars car.jpg --version 2.0
    python scripts/versions.py set-default resnet50_cars 2.0
    python scripts/versions.py rollback resnet50_cars          # default -> the next lower version
    python scripts/versions.py unregister resnet50_cars 2.0
    python scripts/versions.py scale resnet50_cars --workers 2

Archives are registered by file name from the server's model store: TorchServe's allowed_urls
(config.properties) refuses remote URLs, and this tool never sends one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import requests
from packaging.version import InvalidVersion, Version

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_INFERENCE = "http://127.0.0.1:8080"
# Registration loads the model and starts its workers before answering: allow for it.
REGISTER_TIMEOUT_S = 300


class VersionsError(RuntimeError):
    def __init__(self, message: str, exit_code: int = 4):
        super().__init__(message)
        self.exit_code = exit_code


def _version_key(version: str):
    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


class ModelVersions:
    def __init__(
        self,
        management_url=DEFAULT_MANAGEMENT,
        inference_url=DEFAULT_INFERENCE,
        management_token=None,
        inference_token=None,
        timeout=30,
    ):
        self.management_url = management_url.rstrip("/")
        self.inference_url = inference_url.rstrip("/")
        self.timeout = timeout
        self._mgmt_headers = {"Authorization": f"Bearer {management_token}"} if management_token else {}
        self._inf_headers = {"Authorization": f"Bearer {inference_token}"} if inference_token else {}

    def _call(self, method: str, url: str, *, headers, timeout=None, **kwargs):
        timeout = timeout or self.timeout
        try:
            r = requests.request(method, url, headers=headers, timeout=timeout, **kwargs)
        except requests.ConnectionError:  # refused, DNS, TLS, connect timeout
            raise VersionsError(f"TorchServe not reachable at {url.split('/', 3)[:3][-1]}", exit_code=3) from None
        except requests.Timeout:  # connected, but no answer in time: the server's problem
            raise VersionsError(f"{method} {url}: no answer within {timeout:g} s") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL):
            raise VersionsError(f"not a usable URL: {url} (expected e.g. {DEFAULT_MANAGEMENT})", exit_code=2) from None
        except requests.RequestException as err:  # the connection broke mid-answer
            raise VersionsError(f"{method} {url} failed: {type(err).__name__}", exit_code=3) from None
        if r.status_code >= 400:
            try:
                body = r.json()
                message = body.get("message", r.text) if isinstance(body, dict) else r.text
            except ValueError:
                message = r.text
            raise VersionsError(f"{method} {url} -> {r.status_code}: {str(message).strip()}")
        try:
            return r.json() if r.content else {}
        except ValueError:
            raise VersionsError(f"{method} {url} -> {r.status_code} with a body that is not JSON") from None

    def _mgmt(self, method: str, path: str, **kwargs):
        return self._call(method, f"{self.management_url}{path}", headers=self._mgmt_headers, **kwargs)

    # ------------------------------------------------------------ reads

    def versions(self, model: str) -> list[dict]:
        """Every registered version, oldest first, with its worker status and the default marked."""
        details = self._mgmt("GET", f"/models/{model}/all")
        default = self._mgmt("GET", f"/models/{model}")[0]["modelVersion"]
        rows = [
            {
                "version": d["modelVersion"],
                "default": d["modelVersion"] == default,
                "archive": d.get("modelUrl"),
                "workers": [w["status"] for w in d.get("workers", [])],
                "batch_size": d.get("batchSize"),
            }
            for d in details
        ]
        return sorted(rows, key=lambda row: _version_key(row["version"]))

    def default_version(self, model: str) -> str:
        return self._mgmt("GET", f"/models/{model}")[0]["modelVersion"]

    # ------------------------------------------------------------ writes

    def register(self, model: str, archive: str, workers: int = 1, set_default: bool = False) -> dict:
        if "/" in archive or archive.startswith(".") or not archive.endswith(".mar"):
            raise VersionsError(f"give the file name of a .mar in the model store, not a path or URL: {archive!r}", 2)
        result = self._mgmt(
            "POST",
            "/models",
            timeout=REGISTER_TIMEOUT_S,
            params={
                "url": archive,
                "model_name": model,
                "initial_workers": workers,
                "synchronous": "true",
            },
        )
        if set_default:
            version = self._archive_version(model, archive)
            self.set_default(model, version)
        return result

    def _archive_version(self, model: str, archive: str) -> str:
        for row in self.versions(model):
            if row["archive"] == archive:
                return row["version"]
        raise VersionsError(f"{archive} is not registered under {model}")

    def set_default(self, model: str, version: str) -> dict:
        return self._mgmt("PUT", f"/models/{model}/{version}/set-default")

    def rollback(self, model: str) -> str:
        """Make the next lower registered version the default; returns it."""
        versions = [row["version"] for row in self.versions(model)]
        current = self.default_version(model)
        lower = [v for v in versions if _version_key(v) < _version_key(current)]
        if not lower:
            raise VersionsError(f"{model} {current} is the oldest registered version: nothing to roll back to")
        self.set_default(model, lower[-1])
        return lower[-1]

    def unregister(self, model: str, version: str) -> dict:
        return self._mgmt("DELETE", f"/models/{model}/{version}")

    def scale(self, model: str, workers: int, version: str | None = None) -> dict:
        path = f"/models/{model}/{version}" if version else f"/models/{model}"
        return self._mgmt(
            "PUT",
            path,
            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
            timeout=REGISTER_TIMEOUT_S,
        )

    def predict(self, model: str, image: Path, version: str | None = None, topk: int | None = None):
        if not image.is_file():
            raise VersionsError(f"image not found: {image}", 2)
        path = f"/predictions/{model}/{version}" if version else f"/predictions/{model}"
        headers = {**self._inf_headers, **({"X-Top-K": str(topk)} if topk else {})}
        return self._call("PUT", f"{self.inference_url}{path}", headers=headers, data=image.read_bytes())


def print_versions(model: str, rows: list[dict]) -> None:
    print(f"{model}:")
    for row in rows:
        marker = "*" if row["default"] else " "
        print(f" {marker} {row['version']:<10} workers={','.join(row['workers']) or '-':<16} {row['archive']}")
    print("  (* = default version)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--management_url", default=DEFAULT_MANAGEMENT)
    p.add_argument("--inference_url", default=DEFAULT_INFERENCE)
    p.add_argument("--token", default=os.environ.get("TS_MANAGEMENT_TOKEN"), help="management API token")
    p.add_argument("--inference_token", default=os.environ.get("TS_INFERENCE_TOKEN"))
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


def main(argv=None) -> int:
    args = parse_args(argv)
    mv = ModelVersions(args.management_url, args.inference_url, args.token, args.inference_token)
    try:
        if args.command == "register":
            print(mv.register(args.model, args.archive, args.workers, args.set_default).get("status", "registered"))
        elif args.command == "list":
            print_versions(args.model, mv.versions(args.model))
        elif args.command == "predict":
            print(json.dumps(mv.predict(args.model, args.image, args.version, args.topk), indent=1))
        elif args.command == "set-default":
            print(mv.set_default(args.model, args.version).get("status"))
        elif args.command == "rollback":
            print(f"{args.model}: default is now {mv.rollback(args.model)}")
        elif args.command == "unregister":
            print(mv.unregister(args.model, args.version).get("status"))
        elif args.command == "scale":
            print(mv.scale(args.model, args.workers, args.version).get("status"))
    except VersionsError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
