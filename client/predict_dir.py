"""Classify every image under a directory, losing nothing when interrupted.

Two engines run the same chain (decode -> find the car -> cut it out -> classify):

* `server` (default): each image goes as the raw body to a TorchServe's ``/predictions/<model>``, from a
  pool of threads sharing one keep-alive connection pool. A 503 (a full queue, a worker restarting),
  a refused or reset connection and a timeout are retried with backoff (``--retries``); a 4xx (not
  an image, too large) is recorded once.
* `ray`: the export's own `Predictor` (int8 where it ships) in Ray Data actors, on this machine or on
  a Ray cluster (``--address ray://head:10001``); the export travels to the workers in Ray's object
  store, and each worker reads its images from the directory's path (shared storage on a cluster).

Results stream to ``<out>/predictions_<YYYYmmdd-HHMMSS>.jsonl`` as they complete, one line per image,
flushed as it goes: ``{"file": "<path relative to DIR>", "car_found", "car_score", "class_id",
"class_name", "probability", "make", "model", "year", "body_type", "make_probability", "uncertain",
"top_k", "cars"}`` (the fields of the most prominent car; `cars`: every car found, each with its
"box", "score" and those fields, that one first), or ``{"file", "error", "status"}``. The summary
(model, engine, counts - ok, failed, without a car, uncertain, cars found - and the rate) goes to
``<stem>.summary.json`` at the end, and on Ctrl-C or SIGTERM with what was done by then.
``--resume FILE.jsonl`` carries on: files already answered are not sent again, failed ones are; the
finished file holds one line per image, sorted by file, as a clean run's does. ``--csv``, ``--json``
(the summary with every prediction, one file) and ``--parquet`` are derived from the lines at the end.

    predict-dir photos/ --model efficientnet_lite0_cars
    predict-dir photos/ --model efficientnet_lite0_cars --resume predictions/predictions_20261202-101500.jsonl
    predict-dir photos/ --model resnet50_cars --version 2.0 --topk 3 --csv
    predict-dir photos/ --engine ray --export models/efficientnet_lite0_cars --parquet
    predict-dir /mnt/photos --engine ray --export models/efficientnet_lite0_cars --address ray://head:10001

Exit codes: 0 every file classified; 1 some files failed (results still written); 2 no such
directory, no images in it, or a --resume file of another run; 3 TorchServe not reachable (or refused
the token); 4 TorchServe answered with an error, e.g. the model (or version) is not registered;
130 interrupted (the lines and the summary are on disk: --resume carries on).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from carmodel.errors import EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE, exit_with
from carmodel.images import IMAGE_SUFFIXES
from client import add_server_arguments, positive_int, server_client
from client.result_line import from_details, from_error
from serving.client import TorchServeClient, TorchServeError

EXIT_INTERRUPTED = 130
FIELDS = ["car_found", "car_score", "class_id", "class_name", "probability", "make", "model", "year", "body_type"]
FIELDS += ["make_probability", "uncertain"]
CSV_COLUMNS = ["file", *FIELDS, "error", "status"]
SYNC_EVERY_S = 1.0  # fsync the lines at most this often: a power cut loses at most this much


class PredictDirError(RuntimeError):
    """A problem that stops the whole run before any result is worth writing."""

    exit_code = EXIT_SERVER


class UsageError(PredictDirError):
    exit_code = EXIT_USAGE


class NoImagesError(UsageError):
    pass


class ModelNotFoundError(PredictDirError):
    exit_code = EXIT_SERVER


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop sending, keep what is done."""


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


# ----------------------------------------------------------------------------- the results file


def read_lines(path: Path) -> dict[str, dict]:
    """{file: its last result} of a JSON Lines results file; a line cut off by a crash is ignored."""
    results = {}
    with path.open() as lines:
        for line in lines:
            try:
                result = json.loads(line)
            except ValueError:
                continue  # the last line of a run that was killed while writing it
            if isinstance(result, dict) and "file" in result:
                results[result["file"]] = result
    return results


@dataclass
class Results:
    """The run's JSON Lines file: appended and flushed per result, synced to disk at most once a second.
    Opened with the first result, so a run that fails before any image is answered writes nothing."""

    path: Path
    done: dict[str, dict] = field(default_factory=dict)  # file -> result: earlier runs' and this one's
    _file: object = None
    _synced: float = 0.0

    @property
    def written(self) -> bool:
        return self._file is not None or self.path.is_file()

    def add(self, file: str, result: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        line = {"file": file, **result}
        self.done[file] = line
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= SYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def compact(self) -> None:
        """One line per file, sorted by file: what a clean run leaves (written aside, then moved over)."""
        aside = self.path.with_suffix(".jsonl.tmp")
        with aside.open("w") as out:
            for file in sorted(self.done):
                out.write(json.dumps(self.done[file]) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(aside, self.path)


def summary_path(lines: Path) -> Path:
    return lines.with_suffix(".summary.json")


def counts(results: dict[str, dict]) -> dict[str, int]:
    errors = sum("error" in r for r in results.values())
    return {
        "ok": len(results) - errors,
        "error": errors,
        "no_car": sum(r.get("car_found") is False for r in results.values()),
        "uncertain": sum(bool(r.get("uncertain")) for r in results.values()),
        "cars": sum(len(r.get("cars") or []) for r in results.values()),  # every car found (a detector's)
    }


# ----------------------------------------------------------------------------- the server engine


def check_server(client: TorchServeClient, model: str, version: str | None = None, management: bool = False) -> None:
    """Fail before sending any image if TorchServe is down or refuses the token, or (with `management`)
    lacks the model. Without the management API the model is checked by the first prediction instead:
    the hardened profile does not expose the management API to clients."""
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


def predict_file(
    client: TorchServeClient, path: Path, model: str, version: str | None, topk: int | None, first: bool = False
) -> dict:
    """One image -> its result, or {"error", "status"}; never raises, so one bad file cannot stop a run.

    `first`: the run's first file, sent alone; a problem no later file would escape (no such model or
    version, a refused token, the server gone) raises instead of being recorded once per file.
    """
    try:
        answer = client.details(model, path.read_bytes(), version, topk)
        try:
            return from_details(answer)
        except (LookupError, TypeError):
            raise TorchServeError(f"unexpected response: {json.dumps(answer)[:300]}") from None
    except TorchServeError as err:
        if first and err.status == 404:  # the handler itself never answers 404
            raise ModelNotFoundError(_model_missing(model, version, client.inference_url, err.detail)) from None
        if first and err.exit_code == EXIT_UNREACHABLE:
            raise
        return from_error(err.detail, err.status)
    except OSError as err:
        return from_error(f"cannot read file: {type(err).__name__}: {err}", None)


def server_results(
    client: TorchServeClient,
    images: list[Path],
    directory: Path,
    model: str,
    version: str | None,
    topk: int | None,
    concurrency: int,
) -> Iterator[tuple[str, dict]]:
    """(file, result) as each image is answered. The first goes alone: a 404 (model or version not
    registered) or a refused token would otherwise come back once per file."""
    relative = {path: path.relative_to(directory).as_posix() for path in images}
    yield relative[images[0]], predict_file(client, images[0], model, version, topk, first=True)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(predict_file, client, path, model, version, topk): path for path in images[1:]}
        try:
            for future in as_completed(futures):
                yield relative[futures[future]], future.result()
        finally:  # interrupted: drop the queued files instead of sending them all first
            pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """What a run is: where its images and lines are, and what answers them."""

    directory: Path
    lines: Path
    engine: str  # server | ray
    model: str
    version: str | None = None
    where: str | None = None  # the server's URL, or the Ray cluster's address

    def summary(self, results: dict[str, dict], seconds: float, answered: int, complete: bool, started: str) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "engine": self.engine,
            "url" if self.engine == "server" else "address": self.where,
            "directory": str(self.directory.resolve()),
            "lines": str(self.lines),
            "started": started,
            "complete": complete,
            "answered": answered,  # sent and answered by this run (a resumed run skips the earlier ones)
            "seconds": round(seconds, 3),
            "images_per_second": round(answered / seconds, 2) if seconds > 0 else None,
            "counts": counts(results),
        }


def resume_state(lines: Path, run: Run) -> dict[str, dict]:
    """The answered files of an earlier run into `lines` (its errors are sent again); none if there is no
    such file yet, so that the same command can be run until it completes."""
    if not lines.is_file():
        return {}
    earlier = summary_path(lines)
    if earlier.is_file():
        recorded = json.loads(earlier.read_text())
        if (recorded.get("model"), recorded.get("engine")) != (run.model, run.engine):
            earlier_run = f"{recorded.get('model')} ({recorded.get('engine')})"
            raise UsageError(f"{lines} is a run of {earlier_run}, not of {run.model} ({run.engine})")
    return {file: result for file, result in read_lines(lines).items() if "error" not in result}


def execute(
    run: Run,
    images: list[Path],
    answer: Callable[[list[Path]], Iterator[tuple[str, dict]]],
    resume: bool = False,
    progress: bool = False,
) -> dict:
    """Stream every image's result into the run's lines; returns the summary (also written beside them).
    `answer(images)` yields (file, result) as results come in. Interrupted, it writes what was done and
    raises Interrupted."""
    started_at = datetime.now().astimezone().isoformat(timespec="seconds")
    done = resume_state(run.lines, run) if resume else {}
    relative = {path: path.relative_to(run.directory).as_posix() for path in images}
    todo = [path for path in images if relative[path] not in done]
    results = Results(run.lines, dict(done))
    started, answered, complete = time.perf_counter(), 0, False
    try:
        with tqdm(total=len(images), initial=len(images) - len(todo), unit="img", disable=not progress) as bar:
            for file, result in answer(todo) if todo else ():
                results.add(file, result)
                answered += 1
                bar.update()
        complete = True
    except KeyboardInterrupt:
        raise Interrupted from None
    finally:
        results.close()
        if complete:
            results.done = {relative[path]: results.done[relative[path]] for path in images}  # these images only
            results.compact()
        summary = run.summary(results.done, time.perf_counter() - started, answered, complete, started_at)
        if results.written:
            summary_path(run.lines).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- derived outputs


def write_derived(lines: Path, write_csv: bool, write_json: bool, write_parquet: bool) -> list[Path]:
    """CSV, one JSON (the summary with every prediction by file) and Parquet, from the finished lines."""
    results = read_lines(lines)
    written = []
    if write_csv:
        path = lines.with_suffix(".csv")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results.values())
        written.append(path)
    if write_json:
        path = lines.with_suffix(".json")
        summary = json.loads(summary_path(lines).read_text())
        predictions = {file: {k: v for k, v in r.items() if k != "file"} for file, r in results.items()}
        path.write_text(json.dumps({**summary, "predictions": predictions}, indent=2) + "\n")
        written.append(path)
    if write_parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = lines.with_suffix(".parquet")
        rows = [
            {**r, "top_k": json.dumps(r.get("top_k", [])), "cars": json.dumps(r.get("cars", []))}
            for r in results.values()
        ]
        pq.write_table(pa.Table.from_pylist(rows), path)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="folder of images, searched recursively")
    parser.add_argument("--engine", choices=("server", "ray"), default="server", help="who runs the model")
    parser.add_argument("--model", help="registered model name (server engine), e.g. efficientnet_lite0_cars")
    parser.add_argument("--version", help="model version (default: the server's default version)")
    parser.add_argument("--export", type=Path, help="the export folder the ray engine runs")
    parser.add_argument("--address", help="a Ray cluster to join, e.g. ray://head:10001 (default: Ray on this machine)")
    parser.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight, or Ray actors")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="images per Ray batch")
    parser.add_argument("--topk", type=positive_int, help="classes per image (default: the model's setting)")
    parser.add_argument("--retries", type=int, default=8, help="tries again after a 503, a reset or a timeout")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="folder for the results")
    parser.add_argument(
        "--resume", type=Path, help="the .jsonl of an interrupted run to carry on (started there if missing)"
    )
    parser.add_argument("--csv", action="store_true", help="also write a CSV of the results")
    parser.add_argument("--json", action="store_true", help="also write the results as one JSON file")
    parser.add_argument("--parquet", action="store_true", help="also write the results as Parquet")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_server_arguments(parser, management="optional")
    args = parser.parse_args(argv)
    if args.engine == "server" and not args.model:
        parser.error("the server engine needs --model")
    if args.engine == "ray" and not args.export:
        parser.error("the ray engine needs --export")
    return args


def lines_path(args: argparse.Namespace) -> Path:
    if args.resume:
        return args.resume
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = args.out / f"predictions_{stamp}.jsonl", 1
    while path.exists() or summary_path(path).exists():  # two runs within one second
        path, n = args.out / f"predictions_{stamp}-{n}.jsonl", n + 1
    return path


def run_server(args: argparse.Namespace, images: list[Path], progress: bool) -> dict:
    with server_client(args) as probe:  # no retries: a server that is not there is said at once
        check_server(probe, args.model, args.version, bool(args.management_url))
    with server_client(args, pool_size=args.concurrency, retries=args.retries) as client:
        run = Run(args.directory, lines_path(args), "server", args.model, args.version, client.inference_url)
        return execute(
            run,
            images,
            lambda todo: server_results(
                client, todo, args.directory, args.model, args.version, args.topk, args.concurrency
            ),
            bool(args.resume),
            progress,
        )


def run_ray(args: argparse.Namespace, images: list[Path], progress: bool) -> dict:
    from client import ray_engine  # Ray and torch only for this engine

    with ray_engine.connect(args.address):
        export = ray_engine.ExportShipment.of(args.export)
        run = Run(args.directory, lines_path(args), "ray", export.model_name, None, args.address or "local")
        answer = ray_engine.answerer(export, args.directory, args.topk, args.concurrency, args.batch_size)
        return execute(run, images, answer, bool(args.resume), progress)


def raise_interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends a run as Ctrl-C does: what is done is kept


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM as Ctrl-C; and Ctrl-C even when started from a script's background job, which ignores SIGINT
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    try:
        images = find_images(args.directory)
        summary = (run_ray if args.engine == "ray" else run_server)(args, images, not args.quiet)
    except Interrupted:
        print("interrupted: the results so far are written; --resume carries on", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (PredictDirError, TorchServeError) as err:
        return exit_with(err)
    lines = Path(summary["lines"])
    for path in [lines, summary_path(lines), *write_derived(lines, args.csv, args.json, args.parquet)]:
        print(f"saved {path}", file=sys.stderr)
    n = summary["counts"]
    print(
        f"{n['ok']} ok ({n['cars']} cars found, {n['no_car']} without a car, {n['uncertain']} uncertain), "
        f"{n['error']} failed, "
        f"{summary['images_per_second']} images/s",
        file=sys.stderr,
    )
    return 1 if n["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
