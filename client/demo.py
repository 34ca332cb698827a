"""demo: a page in the browser where a person drops car photos and sees the answer.

    demo                                     # http://127.0.0.1:8090, for the TorchServe of `make serve`
    make demo                                # the same, starting TorchServe first if needed
    TS_INFERENCE_TOKEN=... TS_MANAGEMENT_TOKEN=... demo    # the hardened profile: the keys stay here

The page (client/demo_page/) talks only to this small server, on loopback, which forwards each photo
to TorchServe's inference API with the project's one client (serving/client.py): TorchServe's ports
stay out of the browser's reach, no CORS is opened on them, and a key never reaches the browser.
Each answer is the handler's detailed answer (whether there is a car, its box, the make and body
type with their probabilities, whether the model is unsure, the top-5), with the model and version
that answered and the time it took; an error carries TorchServe's (or the handler's) own message and
status.

    GET  /api/models                       the registered models and their versions (management API)
    POST /api/predict?model=M[&version=V]  the photo as the body -> {model, version, ms, car, make, body_type,
                                           uncertain, predictions}
    POST /api/explain?model=M[&version=V]  the photo as the body -> the handler's heat map
    POST /api/preview                      a JPEG of a photo the browser cannot show itself (HEIC)

Exit status: 0 stopped with Ctrl-C; 2 a usage problem (the port is taken).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from carmodel.errors import EXIT_UNREACHABLE, StatusError, exit_with
from carmodel.images import ImageLimits
from carmodel.paths import DEFAULT_MODEL
from client import add_server_arguments, server_client
from client.photos import ClientError, fit_for_display, load_display_image
from serving.client import TorchServeClient, TorchServeError, error_message

PAGE = Path(__file__).with_name("demo_page")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
DEFAULT_PORT = 8090
TOPK = 5
MAX_BODY = ImageLimits().max_bytes  # the handler's own image limit: refused here before it travels


class DemoError(StatusError):
    """What the page is answered: TorchServe's refusal passed on, or the demo server's own."""


def from_torchserve(err: TorchServeError) -> DemoError:
    """TorchServe down is a bad gateway; TorchServe's own refusals keep their status and message."""
    if err.exit_code == EXIT_UNREACHABLE and err.status is None:
        return DemoError(HTTPStatus.BAD_GATEWAY, err.message)
    return DemoError(err.status or HTTPStatus.BAD_GATEWAY, err.detail)


def list_models(client: TorchServeClient) -> list[dict]:
    names = [m["modelName"] for m in client.management("GET", "/models", params={"limit": 100}).get("models", [])]
    return [{"name": name, "versions": client.versions(name)} for name in sorted(names)]


def predict(client: TorchServeClient, model: str, version: str | None, body: bytes) -> dict:
    started = time.perf_counter()
    response = client.predict(model, body, version, TOPK, headers={"X-Details": "true"})
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    if response.status_code != 200:
        raise DemoError(response.status_code, error_message(response))
    return {
        "model": model,
        "version": version or client.default_version(model),
        "ms": elapsed_ms,
        **response.json(),
    }


def preview(body: bytes) -> tuple[bytes, tuple[int, int]]:
    """A JPEG the browser can show, and the size of the photo as the handler sees it (EXIF applied)."""
    image = load_display_image(body, "the photo")
    shown = fit_for_display(image)
    out = io.BytesIO()
    shown.save(out, "JPEG", quality=90)
    return out.getvalue(), image.size


class DemoHandler(BaseHTTPRequestHandler):
    client: TorchServeClient  # set by make_server
    default_model: str = DEFAULT_MODEL
    server_version = "car-demo"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/api/models":
            self._answer(lambda: {"models": list_models(self.client)})
        elif url.path in ("/", "/index.html"):
            self._static("index.html")
        elif url.path.startswith("/static/"):
            self._static(url.path.removeprefix("/static/"))
        else:
            self._error(DemoError(HTTPStatus.NOT_FOUND, f"no such page: {url.path}"))

    def do_POST(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            body = self._body()
            if url.path == "/api/preview":
                self._preview(body)
                return
            # the page names none when it could not list the models (TorchServe down): ask the default
            model, version = query.get("model") or self.default_model, query.get("version") or None
        except DemoError as err:
            self._error(err)
            return
        if url.path == "/api/predict":
            self._answer(lambda: predict(self.client, model, version, body))
        elif url.path == "/api/explain":
            self._answer(lambda: self.client.explain(model, body, version=version))
        else:
            self._error(DemoError(HTTPStatus.NOT_FOUND, f"no such endpoint: {url.path}"))

    def _body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            self._discard(size)
            raise DemoError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"image is {size} bytes; the limit is {MAX_BODY}")
        if size == 0:
            raise DemoError(HTTPStatus.BAD_REQUEST, "empty upload: choose a photo")
        return self.rfile.read(size)

    def _discard(self, size: int) -> None:
        """Read what was sent, so that the browser gets the answer instead of a broken connection."""
        left = min(size, 4 * MAX_BODY)
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
            left -= len(chunk)
        self.close_connection = left > 0

    def _preview(self, body: bytes) -> None:
        try:
            jpeg, (width, height) = preview(body)
        except ClientError as err:
            self._error(DemoError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, str(err)))
            return
        self._send(HTTPStatus.OK, jpeg, "image/jpeg", {"X-Image-Size": f"{width} {height}"})

    def _answer(self, work) -> None:
        try:
            self._json(HTTPStatus.OK, work())
        except TorchServeError as err:
            self._error(from_torchserve(err))
        except DemoError as err:
            self._error(err)

    def _static(self, name: str) -> None:
        path = (PAGE / name).resolve()
        if path.parent != PAGE.resolve() or not path.is_file() or path.suffix not in STATIC_TYPES:
            self._error(DemoError(HTTPStatus.NOT_FOUND, f"no such file: {name}"))
            return
        self._send(HTTPStatus.OK, path.read_bytes(), STATIC_TYPES[path.suffix])

    def _error(self, err: DemoError) -> None:
        """What the page shows: the status and the server's (or TorchServe's) own message, in the
        project's one error body (StatusError.to_json)."""
        self._json(err.status, err.to_json())

    def _json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # one line per request, on stderr as http.server does
        sys.stderr.write(f"demo: {self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")


def make_server(client: TorchServeClient, port: int, default_model: str = DEFAULT_MODEL) -> ThreadingHTTPServer:
    handler = type("BoundDemoHandler", (DemoHandler,), {"client": client, "default_model": default_model})
    return ThreadingHTTPServer(("127.0.0.1", port), handler)  # loopback only


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the page's port (default {DEFAULT_PORT})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"when the page names none (default {DEFAULT_MODEL})")
    add_server_arguments(parser, management="required", timeout=60)
    args = parser.parse_args(argv)
    client = server_client(args, pool_size=8)
    try:
        server = make_server(client, args.port, args.model)
    except OSError as err:
        return exit_with(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror}")
    print(f"car classifier demo on http://127.0.0.1:{server.server_port} (TorchServe at {client.inference_url})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
