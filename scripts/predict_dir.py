"""Classify every image under a directory with a model served by TorchServe.

Walks DIR recursively, sends each image (any case of a training.data image extension) as the
raw request body to ``/predictions/<model>[/<version>]`` from a pool of threads sharing one
keep-alive connection pool, and writes one JSON file (optionally a CSV too) with a result per
file: the top-1 class and the full top-k list, or the error the server gave for that file.

    python scripts/predict_dir.py photos/ --model efficientnet_lite0_cars
    python scripts/predict_dir.py photos/ --model resnet50_cars --version 2.0 --topk 3 --csv
    python scripts/predict_dir.py photos/ --model efficientnet_lite0_cars --concurrency 16 --quiet \\
        --url https://cars.example.org:8443 --token "$(jq -r .inference.key var/run/key_file.json)"

Exit codes: 0 every file classified; 1 some files failed (results still written); 2 no such
directory or no images in it; 3 TorchServe not reachable (or refused the token); 4 the model
(or version) is not registered on the server.

Importable: ``predict_directory(dir, model, ...)`` returns the same dict that is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.data import IMAGE_EXTENSIONS  # noqa: E402

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_ENV = "TS_INFERENCE_TOKEN"
MANAGEMENT_TOKEN_ENV = "TS_MANAGEMENT_TOKEN"
CSV_COLUMNS = ["file", "class_id", "class_name", "probability", "error"]


class PredictDirError(RuntimeError):
    """A problem that stops the whole run before any result is worth writing."""

    exit_code = 1


class NoImagesError(PredictDirError):
    exit_code = 2


class ServerUnavailableError(PredictDirError):
    exit_code = 3


class ModelNotFoundError(PredictDirError):
    exit_code = 4


# ----------------------------------------------------------------------------- input


def find_images(directory: Path) -> list[Path]:
    """Every image file under `directory`, sorted so that runs (and their outputs) are reproducible."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NoImagesError(f"not a directory: {directory}")
    images = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise NoImagesError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {directory}")
    return images


# ----------------------------------------------------------------------------- HTTP


def make_session(concurrency: int, token: str | None) -> requests.Session:
    """One session for all threads: a pool as large as the thread count keeps every connection alive."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=concurrency, pool_maxsize=concurrency)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def prediction_url(url: str, model: str, version: str | None) -> str:
    return f"{url}/predictions/{model}" + (f"/{version}" if version else "")


def _error_message(response: requests.Response) -> str:
    """The server's own message when it sent JSON (handler InputError or TorchServe error), else the text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.text.strip()[:300] or f"HTTP {response.status_code} {response.reason}"


def check_server(
    session: requests.Session,
    url: str,
    model: str,
    version: str | None = None,
    timeout: float = 30,
    management_url: str | None = None,
    management_token: str | None = None,
) -> None:
    """Fail before sending any image if TorchServe is down, or (when the management API is given) lacks the model.

    Without a management URL the model is checked by the first prediction instead (see predict_directory):
    the hardened profile does not expose the management API to clients.
    """
    try:
        response = session.get(f"{url}/ping", timeout=timeout)
    except requests.RequestException as err:
        raise ServerUnavailableError(f"TorchServe not reachable at {url} ({type(err).__name__})") from None
    if response.status_code != 200:
        raise ServerUnavailableError(f"TorchServe at {url} is not healthy: /ping answered {response.status_code}")
    if management_url:
        headers = {"Authorization": f"Bearer {management_token}"} if management_token else {}
        target = f"{management_url}/models/{model}" + (f"/{version}" if version else "")
        try:
            response = session.get(target, headers=headers, timeout=timeout)
        except requests.RequestException as err:
            raise ServerUnavailableError(f"management API not reachable at {management_url} ({err})") from None
        if response.status_code == 404:
            raise ModelNotFoundError(_model_missing(model, version, url, _error_message(response)))
        if response.status_code != 200:
            raise ServerUnavailableError(f"management API at {management_url}: {_error_message(response)}")


def _model_missing(model: str, version: str | None, url: str, detail: str) -> str:
    name = f"{model} version {version}" if version else model
    return f"model {name} not found on the server at {url} ({detail})"


def predict_file(
    session: requests.Session,
    path: Path,
    endpoint: str,
    topk: int | None = None,
    timeout: float = 30,
) -> dict:
    """One image -> its prediction, or {"error", "status"}; never raises, so one bad file cannot stop a run."""
    headers = {"Content-Type": "application/octet-stream"}
    if topk is not None:
        headers["X-Top-K"] = str(topk)
    try:
        data = path.read_bytes()
        response = session.put(endpoint, data=data, headers=headers, timeout=timeout)
    except OSError as err:  # unreadable file; requests' own errors are OSErrors too
        kind = "request failed" if isinstance(err, requests.RequestException) else "cannot read file"
        return {"error": f"{kind}: {type(err).__name__}: {err}", "status": None}
    if response.status_code != 200:
        return {"error": _error_message(response), "status": response.status_code}
    try:
        top_k = response.json()
        best = top_k[0]
        return {
            "class_id": best["class_id"],
            "class_name": best["class_name"],
            "probability": best["probability"],
            "top_k": top_k,
        }
    except (ValueError, LookupError, TypeError):
        return {"error": f"unexpected response: {response.text[:300]}", "status": response.status_code}


# ----------------------------------------------------------------------------- run


def predict_directory(
    directory: Path | str,
    model: str,
    url: str = DEFAULT_URL,
    version: str | None = None,
    concurrency: int = 8,
    topk: int | None = None,
    token: str | None = None,
    timeout: float = 30,
    management_url: str | None = None,
    management_token: str | None = None,
    progress: bool = False,
) -> dict:
    """Classify every image under `directory`; returns the results dict that main() writes.

    Raises NoImagesError, ServerUnavailableError or ModelNotFoundError before any image is sent
    (apart from the one probe request below).
    """
    directory = Path(directory)
    url = url.rstrip("/")
    images = find_images(directory)
    session = make_session(concurrency, token)
    try:
        check_server(
            session, url, model, version, timeout, management_url and management_url.rstrip("/"), management_token
        )
        endpoint = prediction_url(url, model, version)
        started_at = datetime.now().astimezone()
        started = time.perf_counter()
        results: dict[Path, dict] = {}
        with tqdm(total=len(images), unit="img", disable=not progress, file=sys.stderr) as bar:
            # The first image goes alone: a 404 (model/version not registered) or 401/403 (bad token)
            # would otherwise come back once per file; the handler itself never answers 404.
            results[images[0]] = first = predict_file(session, images[0], endpoint, topk, timeout)
            if first.get("status") == 404:
                raise ModelNotFoundError(_model_missing(model, version, url, first["error"]))
            if first.get("status") in (401, 403):
                raise ServerUnavailableError(f"TorchServe at {url} refused the request: {first['error']}")
            bar.update()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                futures = {
                    pool.submit(predict_file, session, path, endpoint, topk, timeout): path for path in images[1:]
                }
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except BaseException:  # Ctrl-C: drop the queued files instead of sending them all first
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        seconds = time.perf_counter() - started
    finally:
        session.close()
    errors = sum("error" in r for r in results.values())
    return {
        "model": model,
        "version": version,
        "url": url,
        "directory": str(directory.resolve()),
        "started": started_at.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(images) / seconds, 2) if seconds > 0 else None,
        "counts": {"ok": len(images) - errors, "error": errors},
        # Sorted by path, not completion order: the same directory gives the same file layout.
        "predictions": {path.relative_to(directory).as_posix(): results[path] for path in images},
    }


# ----------------------------------------------------------------------------- output


def _free_path(path: Path) -> Path:
    """Two runs within one second must not overwrite each other's results."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def write_results(output: dict, out_dir: Path | str, write_csv: bool = False) -> list[Path]:
    """Save the results as predictions_<YYYYmmdd-HHMMSS>.json (and .csv); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(output["started"]).strftime("%Y%m%d-%H%M%S")
    json_path = _free_path(out_dir / f"predictions_{stamp}.json")
    json_path.write_text(json.dumps(output, indent=2) + "\n")
    written = [json_path]
    if write_csv:
        csv_path = json_path.with_suffix(".csv")
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for file, result in output["predictions"].items():
                writer.writerow({"file": file, **{k: result.get(k, "") for k in CSV_COLUMNS[1:]}})
        written.append(csv_path)
    return written


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="folder of images, searched recursively")
    parser.add_argument("--model", required=True, help="registered model name, e.g. efficientnet_lite0_cars")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"TorchServe inference API (default {DEFAULT_URL})")
    parser.add_argument("--version", help="model version (default: the server's default version)")
    parser.add_argument("--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--topk", type=_positive_int, help="classes per image (default: the model's setting)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="folder for the results")
    parser.add_argument("--csv", action="store_true", help="also write a CSV next to the JSON")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"inference token (default ${TOKEN_ENV})")
    parser.add_argument("--timeout", type=float, default=30, help="seconds per request (default 30)")
    parser.add_argument("--management_url", help="check the model on the management API first (optional)")
    parser.add_argument(
        "--management_token",
        default=os.environ.get(MANAGEMENT_TOKEN_ENV),
        help=f"management token (default ${MANAGEMENT_TOKEN_ENV})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no JSON on stdout")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        output = predict_directory(
            args.directory,
            args.model,
            url=args.url,
            version=args.version,
            concurrency=args.concurrency,
            topk=args.topk,
            token=args.token,
            timeout=args.timeout,
            management_url=args.management_url,
            management_token=args.management_token,
            progress=not args.quiet,
        )
    except PredictDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if not args.quiet:
        print(json.dumps(output, indent=2))
    for path in write_results(output, args.out, args.csv):
        print(f"saved {path}", file=sys.stderr)
    counts = output["counts"]
    print(f"{counts['ok']} ok, {counts['error']} failed, {output['images_per_second']} images/s", file=sys.stderr)
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
