"""The model registry's read side (MLflow): which export a reference names, and fetching it.

Registered models are export folders (carmodel/export.py). training.tracking writes them; the gate
and `training.register --download` (which `make release-archive` archives) read them with these.
The store is the project's own `mlruns/` (carmodel.paths) unless MLFLOW_TRACKING_URI names another.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from carmodel import paths

URI_ENV = "MLFLOW_TRACKING_URI"
REFERENCE = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(RuntimeError):
    pass


def tracking_uri() -> str:
    return os.environ.get(URI_ENV) or f"sqlite:///{paths.mlruns() / 'mlflow.db'}"


def client_mlflow():
    """mlflow, pointed at the project's store (or $MLFLOW_TRACKING_URI)."""
    try:
        import mlflow
    except ImportError as err:
        raise RegistryError("mlflow is not installed: pip install -r requirements/train.txt") from err
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """NAME@ALIAS or NAME/VERSION (optionally as models:/...) -> (name, alias, version)."""
    match = REFERENCE.match(text.strip())
    if not match:
        raise RegistryError(f"a registered model is NAME@ALIAS or NAME/VERSION, got {text!r}")
    return match["name"], match["alias"], match["version"]


def model_version(reference: str):
    """The registry's ModelVersion for NAME@ALIAS or NAME/VERSION, or None if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_reference(reference)
    client_mlflow()
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        return None


def download_registered(reference: str, dest: Path) -> tuple[Path, str]:
    """The export folder of a registered version, downloaded into `dest`, and that version's number."""
    found = model_version(reference)
    if found is None:
        raise RegistryError(f"no registered model {reference!r} in {tracking_uri()}")
    mlflow = client_mlflow()
    path = mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(dest))
    return Path(path), str(found.version)
