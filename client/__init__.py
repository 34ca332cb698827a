"""Command-line clients of a running TorchServe: `predict-dir`, `explain`, `versions`.

All three talk to TorchServe through serving.client.TorchServeClient and spell their connection
flags the same way (add_server_arguments), so a flag or an exit status means the same in each:

    --url URL                   the inference API (alias --inference_url; default http://127.0.0.1:8080)
    --management_url URL        the management API (versions; predict-dir's optional model check)
    --token KEY                 the inference key (alias --inference_token; default $TS_INFERENCE_TOKEN)
    --management_token KEY      the management key (default $TS_MANAGEMENT_TOKEN)
    --timeout SECONDS           per request

With the hardened profile the keys are in var/run/key_file.json:
    export TS_INFERENCE_TOKEN=$(jq -r .inference.key var/run/key_file.json)
    export TS_MANAGEMENT_TOKEN=$(jq -r .management.key var/run/key_file.json)

Exit status: 0 done; 2 a usage problem or bad local input; 3 TorchServe not reachable, or it
refused the token; 4 TorchServe answered with an error. predict-dir adds 1: some files failed.

Nothing here imports torch: the clients start in well under a second.
"""

from __future__ import annotations

import argparse
import os

from serving.client import DEFAULT_INFERENCE, DEFAULT_MANAGEMENT, TorchServeClient

INFERENCE_TOKEN_ENV = "TS_INFERENCE_TOKEN"
MANAGEMENT_TOKEN_ENV = "TS_MANAGEMENT_TOKEN"


def add_server_arguments(
    parser: argparse.ArgumentParser,
    *,
    management: str | None = None,
    timeout: float = 30,
) -> None:
    """The connection flags. `management`: None for a client that never calls the management API,
    "optional" for one that may (no default URL), "required" for one that always does."""
    group = parser.add_argument_group("TorchServe")
    group.add_argument(
        "--url",
        "--inference_url",
        dest="url",
        default=DEFAULT_INFERENCE,
        help=f"inference API (default {DEFAULT_INFERENCE})",
    )
    group.add_argument(
        "--token",
        "--inference_token",
        dest="token",
        help=f"inference API key, when token authorization is on (default ${INFERENCE_TOKEN_ENV})",
    )
    if management:
        url_help = (
            f"management API (default {DEFAULT_MANAGEMENT})"
            if management == "required"
            else "check the model on the management API first (optional)"
        )
        group.add_argument(
            "--management_url", default=DEFAULT_MANAGEMENT if management == "required" else None, help=url_help
        )
        group.add_argument("--management_token", help=f"management API key (default ${MANAGEMENT_TOKEN_ENV})")
    group.add_argument(
        "--timeout", type=_positive_float, default=timeout, help=f"seconds per request (default {timeout:g})"
    )


def server_client(args: argparse.Namespace, pool_size: int | None = None, retries: int = 0) -> TorchServeClient:
    """The client the flags (and the token variables) describe."""
    return TorchServeClient(
        inference_url=args.url,
        management_url=getattr(args, "management_url", None) or DEFAULT_MANAGEMENT,
        inference_token=args.token or os.environ.get(INFERENCE_TOKEN_ENV) or None,
        management_token=getattr(args, "management_token", None) or os.environ.get(MANAGEMENT_TOKEN_ENV) or None,
        timeout=args.timeout,
        pool_size=pool_size,
        retries=retries,
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value
