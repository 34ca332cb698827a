"""Classify every image under a directory with a model served by TorchServe.

Walks DIR recursively, sends each image (any case of a suffix carmodel.images accepts) as the
raw request body to ``/predictions/<model>[/<version>]`` from a pool of threads sharing one
keep-alive connection pool, and writes one JSON file (optionally a CSV too) with a result per
file: the top-1 class and the full top-k list, or the error the server gave for that file.

    predict-dir photos/ --model efficientnet_lite0_cars
    predict-dir photos/ --model resnet50_cars --version 2.0 --topk 3 --csv
    predict-dir photos/ --model efficientnet_lite0_cars --concurrency 16 --quiet \\
        --url https://cars.example.org:8443 --token "$(jq -r .inference.key var/run/key_file.json)"

Exit codes: 0 every file classified; 1 some files failed (results still written); 2 no such
directory or no images in it; 3 TorchServe not reachable (or refused the token); 4 TorchServe
answered with an error, e.g. the model (or version) is not registered.

Importable: ``predict_directory(dir, model, ...)`` returns the same dict that is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from carmodel.images import IMAGE_SUFFIXES
from client import add_server_arguments, positive_int, server_client
from serving.client import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE, TorchServeClient, TorchServeError

CSV_COLUMNS = ["file", "class_id", "class_name", "probability", "error"]


class PredictDirError(RuntimeError):
    """A problem that stops the whole run before any result is worth writing."""

    exit_code = EXIT_SERVER


class NoImagesError(PredictDirError):
    exit_code = EXIT_USAGE


class ModelNotFoundError(PredictDirError):
    exit_code = EXIT_SERVER


# ----------------------------------------------------------------------------- input


def find_images(directory: Path | str) -> list[Path]:
    """Every image file under `directory`, sorted so that runs (and their outputs) are reproducible."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NoImagesError(f"not a directory: {directory}")
    images = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise NoImagesError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {directory}")
    return images


# ----------------------------------------------------------------------------- HTTP


def check_server(client: TorchServeClient, model: str, version: str | None = None, management: bool = False) -> None:
    """Fail before sending any image if TorchServe is down or refuses the token, or (with `management`)
    lacks the model.

    Without the management API the model is checked by the first prediction instead (see
    predict_directory): the hardened profile does not expose the management API to clients.
    """
    client.health()
    if management:
        try:
            client.describe(model, version)
        except TorchServeError as err:
            if err.status == 404:
                raise ModelNotFoundError(_model_missing(model, version, client.inference_url, err.detail)) from None
            raise


def _model_missing(model: str, version: str | None, url: str, detail: str) -> str:
    name = f"{model} version {version}" if version else model
    return f"model {name} not found on the server at {url} ({detail})"


def classify(client: TorchServeClient, path: Path, model: str, version: str | None, topk: int | None) -> dict:
    """One image -> its prediction; raises OSError (the file) or TorchServeError (the server)."""
    top_k = client.top_k(model, path.read_bytes(), version, topk)
    try:
        best = top_k[0]
        return {
            "class_id": best["class_id"],
            "class_name": best["class_name"],
            "probability": best["probability"],
            "top_k": top_k,
        }
    except (LookupError, TypeError):
        raise TorchServeError(f"unexpected response: {json.dumps(top_k)[:300]}") from None


def predict_file(
    client: TorchServeClient,
    path: Path,
    model: str,
    version: str | None = None,
    topk: int | None = None,
    first: bool = False,
) -> dict:
    """One image -> its prediction, or {"error", "status"}; never raises, so one bad file cannot stop a run.

    `first`: the run's first file, sent alone; a problem no later file would escape (no such model or
    version, a refused token, the server gone) raises instead of being recorded once per file.
    """
    try:
        return classify(client, path, model, version, topk)
    except TorchServeError as err:
        if first and err.status == 404:  # the handler itself never answers 404
            raise ModelNotFoundError(_model_missing(model, version, client.inference_url, err.detail)) from None
        if first and err.exit_code == EXIT_UNREACHABLE:
            raise
        return {"error": err.detail, "status": err.status}
    except OSError as err:
        return {"error": f"cannot read file: {type(err).__name__}: {err}", "status": None}


# ----------------------------------------------------------------------------- run


def predict_directory(
    directory: Path | str,
    model: str,
    client: TorchServeClient | None = None,
    version: str | None = None,
    concurrency: int = 8,
    topk: int | None = None,
    check_model: bool = False,
    progress: bool = False,
) -> dict:
    """Classify every image under `directory` on the server `client` talks to (default: the local
    one); returns the results dict that main() writes. `check_model`: ask the management API for
    the model before sending anything.

    Raises NoImagesError, ModelNotFoundError or TorchServeError (not reachable, token refused, ...)
    before any image is sent (apart from the one probe request below).
    """
    directory = Path(directory)
    images = find_images(directory)
    if client is None:
        with TorchServeClient(pool_size=concurrency) as own:
            return predict_directory(directory, model, own, version, concurrency, topk, check_model, progress)
    check_server(client, model, version, check_model)
    started_at = datetime.now().astimezone()
    started = time.perf_counter()
    results: dict[Path, dict] = {}
    with tqdm(total=len(images), unit="img", disable=not progress, file=sys.stderr) as bar:
        # The first image goes alone: a 404 (model/version not registered) or a refused token would
        # otherwise come back once per file.
        results[images[0]] = predict_file(client, images[0], model, version, topk, first=True)
        bar.update()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = {pool.submit(predict_file, client, path, model, version, topk): path for path in images[1:]}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:  # Ctrl-C: drop the queued files instead of sending them all first
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    seconds = time.perf_counter() - started
    errors = sum("error" in r for r in results.values())
    return {
        "model": model,
        "version": version,
        "url": client.inference_url,
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
    parser.add_argument("--version", help="model version (default: the server's default version)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--topk", type=positive_int, help="classes per image (default: the model's setting)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="folder for the results")
    parser.add_argument("--csv", action="store_true", help="also write a CSV next to the JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no JSON on stdout")
    add_server_arguments(parser, management="optional")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with server_client(args, pool_size=args.concurrency) as client:
            output = predict_directory(
                args.directory,
                args.model,
                client,
                version=args.version,
                concurrency=args.concurrency,
                topk=args.topk,
                check_model=bool(args.management_url),
                progress=not args.quiet,
            )
    except (PredictDirError, TorchServeError) as err:
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
