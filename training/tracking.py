"""Experiment tracking and the model registry, with MLflow.

Every training, tuning and evaluation run logs to MLflow: params (the whole Config), per-epoch
metrics, plots, and the export. The store is the project's own `mlruns/` (SQLite, artifacts
next to it; `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` shows it) unless
MLFLOW_TRACKING_URI names another - a team server, say. A run directory (and the export made
from it) remembers its MLflow run in `mlflow_run.json`, so evaluate, export and register add to
the run that trained the model instead of scattering one model over several runs.

Registered models are the export folder itself (weights, index_to_name.json, model.yaml,
metrics, int8 model), so `training.register --download` then `build-mar --export` builds the same
archive from the registry as from the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from carmodel.export import METRICS, ExportDir
from training.registry import RegistryError as TrackingError
from training.registry import client_mlflow, tracking_uri

RUN_FILE = "mlflow_run.json"
EXPORT_ARTIFACT = "export"  # where a registered export lives inside its run's artifacts
REGISTRY_METRICS = ("top1", "top5", "macro_f1", "num_images")  # copied onto the model version as tags

log = logging.getLogger(__name__)


def experiment_id(mlflow, name: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri()))


def artifact_location(uri: str) -> str | None:
    """Artifacts next to a SQLite store; its default, ./mlartifacts, is relative to wherever Python started."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def read_run_id(folder: Path) -> str | None:
    """The MLflow run recorded in `folder`, if it lives in the store we log to now."""
    path = Path(folder) / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record.get("run_id") if record.get("tracking_uri") == tracking_uri() else None


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """MLflow params are flat strings."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


@dataclass
class Tracker:
    """One MLflow run, or nothing at all when tracking is off (`--track false`)."""

    mlflow: object | None = None
    run_id: str | None = None

    def params(self, values: dict) -> None:
        if self.mlflow:
            self.mlflow.log_params(flatten(values))

    def metrics(self, values: dict, step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mlflow and numbers:
            self.mlflow.log_metrics(numbers, step=step)

    def artifacts(self, *paths: Path, folder: str | None = None) -> None:
        for path in paths:
            if self.mlflow and Path(path).is_file():
                self.mlflow.log_artifact(str(path), artifact_path=folder)

    def directory(self, path: Path, folder: str) -> None:
        if self.mlflow:
            self.mlflow.log_artifacts(str(path), artifact_path=folder)

    def tags(self, values: dict) -> None:
        if self.mlflow:
            self.mlflow.set_tags(flatten(values))


@contextlib.contextmanager
def tracked(
    folder: Path, enabled: bool = True, experiment: str = "stanford-cars", name: str | None = None
) -> Iterator[Tracker]:
    """An MLflow run for the run/export in `folder`: the one recorded there, else a new one."""
    if not enabled:
        yield Tracker()
        return
    mlflow = client_mlflow()
    folder = Path(folder)
    run_id = read_run_id(folder)
    kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id(mlflow, experiment), "run_name": name}
    with mlflow.start_run(**kwargs) as active:
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "run_id": active.info.run_id,
            "experiment_id": active.info.experiment_id,
            "tracking_uri": tracking_uri(),
        }
        (folder / RUN_FILE).write_text(json.dumps(record, indent=1))
        yield Tracker(mlflow, active.info.run_id)


# ------------------------------------------------------------------------------ registry


def register_export(export: Path, name: str, alias: str | None = None, experiment: str = "stanford-cars") -> str:
    """Log the export folder to its run and register it as a new version of `name`; returns the version."""
    export = Path(export)
    metrics_file = ExportDir(export).record(METRICS)
    if not metrics_file.is_file():
        raise TrackingError(f"{metrics_file} is missing: evaluate and export the run first")
    metrics = json.loads(metrics_file.read_text())
    with tracked(export, experiment=experiment, name=f"register-{name}") as tracker:
        tracker.directory(export, EXPORT_ARTIFACT)
        source = tracker.mlflow.get_artifact_uri(EXPORT_ARTIFACT)
    tags = {key: str(metrics[key]) for key in REGISTRY_METRICS if key in metrics}
    tags["split"] = str(metrics.get("split"))
    # The export is a folder of files, not an MLflow-flavoured model: register its artifact URI
    # directly (mlflow.register_model wants a logged model for runs:/ URIs since MLflow 3).
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Stanford Cars classifier export (training.export)")
    version = client.create_model_version(name, source, run_id=tracker.run_id, tags=tags)
    if alias:
        set_alias(name, version.version, alias)
    return str(version.version)


def set_alias(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient

    client_mlflow()
    MlflowClient().set_registered_model_alias(name, alias, str(version))
