"""The TorchServe HTTP client: addresses, tokens, timeouts and error messages in one place.

Used by the lifecycle code (serving/torchserve.py: readiness), the command-line clients
(client/), the benchmarks and the tests. Imports no torch: a client starts in well under a second.

Every failure is a `TorchServeError` (a carmodel.errors.StatusError) whose `exit_code` the
command-line clients return: EXIT_USAGE for a usage problem (bad URL, an archive path instead of a
store file name), EXIT_UNREACHABLE when TorchServe is not reachable or refused the token, EXIT_SERVER
when it answered with an error (`status` holds the HTTP status, `detail` the server's own message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import requests
from packaging.version import InvalidVersion, Version
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from carmodel.errors import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE, StatusError

DEFAULT_INFERENCE = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_METRICS = "http://127.0.0.1:8082"
# Registration and scaling load the model and start its workers before TorchServe answers.
REGISTER_TIMEOUT_S = 300
# The longest server message kept: an HTML error page from a proxy is not worth printing whole.
MAX_MESSAGE_CHARS = 500
TRANSIENT_STATUSES = (502, 503, 504)  # a proxy's or TorchServe's "not now": worth another try
RETRY_BACKOFF_MAX_S = 30


class TorchServeError(StatusError):
    """`status`: TorchServe's HTTP status (None: no answer); `exit_code`: the command line's."""

    def __init__(
        self, message: str, exit_code: int = EXIT_SERVER, status: int | None = None, detail: str | None = None
    ):
        super().__init__(status, message, exit_code)
        self.detail = detail if detail is not None else message  # the server's own words, when it answered


def error_message(response: requests.Response) -> str:
    """TorchServe's (and our handler's) JSON `message`, else the body's text, else the reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"]).strip()[:MAX_MESSAGE_CHARS]
    return response.text.strip()[:MAX_MESSAGE_CHARS] or response.reason or f"HTTP {response.status_code}"


def token_refused(response: requests.Response) -> bool:
    """TorchServe 0.12 answers a missing or wrong key with 400 InvalidKeyException (not 401)."""
    if response.status_code in (401, 403):
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("type") == "InvalidKeyException"


def raise_for_status(method: str, url: str, response: requests.Response) -> None:
    """An HTTP error as a TorchServeError with TorchServe's message (exit 3 for a refused key, else 4)."""
    if response.status_code >= 400:
        detail = error_message(response)
        raise TorchServeError(
            f"{method} {url} -> {response.status_code}: {detail}",
            EXIT_UNREACHABLE if token_refused(response) else EXIT_SERVER,
            status=response.status_code,
            detail=detail,
        )


def transient_retries(times: int) -> Retry:
    """urllib3's retry policy for what passes: every method (our PUTs are idempotent), never a 4xx."""
    return Retry(
        total=times,
        backoff_factor=0.5,
        backoff_max=RETRY_BACKOFF_MAX_S,
        status_forcelist=TRANSIENT_STATUSES,
        allowed_methods=None,
        raise_on_status=False,  # the last answer stands, with the server's message
        respect_retry_after_header=True,
    )


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def version_key(version: str):
    """Sort key for model versions: numeric order (1.10 after 1.9), unparsable names last."""
    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


def check_archive_name(archive: str) -> None:
    """Registration by a file name in the server's model store only: never a URL or a path."""
    if "/" in archive or "\\" in archive or archive.startswith(".") or not archive.endswith(".mar"):
        raise TorchServeError(
            f"give the file name of a .mar in the model store, not a path or URL: {archive!r}", EXIT_USAGE
        )


@dataclass
class TorchServeClient:
    inference_url: str = DEFAULT_INFERENCE
    management_url: str = DEFAULT_MANAGEMENT
    metrics_url: str = DEFAULT_METRICS
    inference_token: str | None = None
    management_token: str | None = None
    timeout: float = 30
    # Connections kept alive per host: as many as the threads sharing this client (requests keeps 10).
    pool_size: int | None = None
    # Tries again after a 502/503/504 (a full queue, a worker or TorchServe restarting), a refused or
    # reset connection and a timeout, with exponential backoff (0.5 s, 1 s, ... up to 30 s between tries).
    retries: int = 0
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self):
        self.inference_url = self.inference_url.rstrip("/")
        self.management_url = self.management_url.rstrip("/")
        self.metrics_url = self.metrics_url.rstrip("/")
        if self.inference_url.startswith("https"):
            self.session.verify = False  # TorchServe's self-signed certificate (hardened profile)
        if self.pool_size or self.retries:
            size = self.pool_size or 10
            adapter = HTTPAdapter(pool_connections=size, pool_maxsize=size, max_retries=transient_retries(self.retries))
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> TorchServeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def request(self, method: str, url: str, *, token: str | None = None, timeout: float | None = None, **kwargs):
        """The raw response (any status); only a failure to get one raises."""
        timeout = timeout or self.timeout
        headers = {**bearer(token), **kwargs.pop("headers", {})}
        try:
            return self.session.request(method, url, headers=headers, timeout=timeout, **kwargs)
        except requests.ConnectionError:  # refused, DNS, TLS, connect timeout
            raise TorchServeError(f"TorchServe not reachable at {_origin(url)}", EXIT_UNREACHABLE) from None
        except requests.Timeout:  # connected, but no answer in time: the server's problem
            raise TorchServeError(f"{method} {url}: no answer within {timeout:g} s") from None
        except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL):
            example = f"http://{url}" if "://" not in url else DEFAULT_INFERENCE
            raise TorchServeError(f"not a usable URL: {url} (expected e.g. {example})", EXIT_USAGE) from None
        except requests.RequestException as err:  # the connection broke mid-answer
            raise TorchServeError(f"{method} {url} failed: {type(err).__name__}", EXIT_UNREACHABLE) from None

    def call(self, method: str, url: str, **kwargs):
        """The JSON answer of a successful call; an HTTP error raises with TorchServe's message."""
        response = self.request(method, url, **kwargs)
        raise_for_status(method, url, response)
        try:
            return response.json() if response.content else {}
        except ValueError:
            raise TorchServeError(
                f"{method} {url} -> {response.status_code} with a body that is not JSON: "
                f"{response.text.strip()[:MAX_MESSAGE_CHARS]!r}",
                status=response.status_code,
            ) from None

    def management(self, method: str, path: str, **kwargs):
        return self.call(method, f"{self.management_url}{path}", token=self.management_token, **kwargs)

    # ------------------------------------------------------------------ inference API

    def health(self, timeout: float | None = None) -> dict:
        """`GET /ping` (with token auth on, it needs the inference key); raises when TorchServe is
        unreachable, refuses the token (exit 3) or is not healthy (exit 4)."""
        return self.call("GET", f"{self.inference_url}/ping", token=self.inference_token, timeout=timeout)

    def ping(self) -> bool:
        """TorchServe's front end answers, healthy."""
        try:
            self.health(timeout=2)
        except TorchServeError:
            return False
        return True

    def prediction_url(self, model: str, version: str | None = None, api: str = "predictions") -> str:
        return f"{self.inference_url}/{api}/{model}" + (f"/{version}" if version else "")

    def predict(self, model: str, body: bytes, version: str | None = None, topk: int | None = None, **kwargs):
        """The raw response to `PUT /predictions/<model>[/<version>]` with the image as the body."""
        request = self._prediction(body, topk)
        request["headers"].update(kwargs.pop("headers", {}))
        return self.request("PUT", self.prediction_url(model, version), **request, **kwargs)

    def top_k(self, model: str, body: bytes, version: str | None = None, topk: int | None = None) -> list[dict]:
        """The server's plain answer for one image, best class first ([] for no car); an HTTP error raises."""
        return self.call("PUT", self.prediction_url(model, version), **self._prediction(body, topk))

    def details(self, model: str, body: bytes, version: str | None = None, topk: int | None = None) -> dict:
        """The detailed answer: {"car": {"found", "score", "box"}, "make", "body_type", "uncertain", "predictions"}."""
        return self.call("PUT", self.prediction_url(model, version), **self._prediction(body, topk, details=True))

    def _prediction(self, body: bytes, topk: int | None, details: bool = False) -> dict:
        headers = {"Content-Type": "application/octet-stream", **({"X-Top-K": str(topk)} if topk else {})}
        if details:
            headers["X-Details"] = "true"
        return {"token": self.inference_token, "data": body, "headers": headers}

    def explain(
        self,
        model: str,
        body: bytes,
        target: int | None = None,
        filename: str = "image.jpg",
        version: str | None = None,
    ):
        """`POST /explanations/<model>[/<version>]`: the handler's attribution of the top-1 class,
        or of class `target`, for one image."""
        url = self.prediction_url(model, version, api="explanations")
        if target is None:  # a raw body, as with `curl -T car.jpg`
            request = {"data": body, "headers": {"Content-Type": "application/octet-stream"}}
        else:  # a raw body has no room for a second value, so the target travels as a form field
            request = {"files": {"data": (filename, body, "application/octet-stream")}, "data": {"target": str(target)}}
        return self.call("POST", url, token=self.inference_token, **request)

    # ------------------------------------------------------------------ management API: reads

    def describe(self, model: str, version: str | None = None, customized: bool = False) -> list[dict]:
        """`GET /models/<model>[/<version>]`: one entry per version (workers, batching, ...)."""
        params = {"customized": "true"} if customized else None
        return self.management("GET", f"/models/{model}" + (f"/{version}" if version else ""), params=params)

    def handler_description(self, model: str, version: str | None = None) -> dict | None:
        """Our handler's own description (engine, settings, load_error) of the default or given version."""
        for entry in self.describe(model, version, customized=True):
            meta = entry.get("customizedMetadata")
            try:
                meta = json.loads(meta) if isinstance(meta, str) else meta
            except ValueError:
                continue
            if isinstance(meta, dict):
                return meta
        return None

    def load_error(self, model: str, version: str | None = None) -> str | None:
        """Why a worker could not load the model (its default version, or `version`), as the handler
        reports it; None when it loaded fine or cannot be asked."""
        try:
            description = self.handler_description(model, version)
        except TorchServeError:
            return None
        return (description or {}).get("load_error")

    def model_ready(self, model: str) -> bool:
        try:
            versions = self.describe(model)
        except TorchServeError:
            return False
        return any(w["status"] == "READY" for v in versions for w in v.get("workers", []))

    def default_version(self, model: str) -> str:
        return self.describe(model)[0]["modelVersion"]

    def versions(self, model: str) -> list[dict]:
        """Every registered version, oldest first: {version, default, archive, workers (statuses), batch_size}."""
        details = self.describe(model, "all")
        default = self.default_version(model)
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
        return sorted(rows, key=lambda row: version_key(row["version"]))

    # ------------------------------------------------------------------ management API: writes

    def register(self, model: str, archive: str, workers: int = 1) -> dict:
        """Register `archive`, a file name in the server's model store (never a URL), under `model`;
        answers once its workers are up."""
        check_archive_name(archive)
        params = {"url": archive, "model_name": model, "initial_workers": workers, "synchronous": "true"}
        return self.management("POST", "/models", params=params, timeout=REGISTER_TIMEOUT_S)

    def unregister(self, model: str, version: str | None = None) -> dict:
        return self.management("DELETE", f"/models/{model}" + (f"/{version}" if version else ""))

    def set_default(self, model: str, version: str) -> dict:
        return self.management("PUT", f"/models/{model}/{version}/set-default")

    def scale(self, model: str, workers: int, version: str | None = None) -> dict:
        return self.management(
            "PUT",
            f"/models/{model}" + (f"/{version}" if version else ""),
            params={"min_worker": workers, "max_worker": workers, "synchronous": "true"},
            timeout=REGISTER_TIMEOUT_S,
        )

    # ------------------------------------------------------------------ metrics API

    def metrics(self, names: list[str] | None = None) -> str:
        """The Prometheus text of `GET /metrics` (optionally only `names`)."""
        params = {"name[]": names} if names else None
        url = f"{self.metrics_url}/metrics"
        response = self.request("GET", url, params=params)
        raise_for_status("GET", url, response)
        return response.text


def _origin(url: str) -> str:
    return "/".join(url.split("/", 3)[:3])
