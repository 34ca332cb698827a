"""The default model's name, and where the project's folders are.

The folders (models/, model_store/, var/, mlruns/) and config.properties belong to a working copy,
not to the packages: they are found from a home directory, the current working directory unless
$CAR_CLASSIFIER_HOME names another, never from ``__file__``. A plain `pip install .` (the Docker
image) puts the packages in site-packages, far from any checkout; from the checkout's root (where
`make` and the docs run every command) the two are the same. Each is a function, so a changed cwd
or variable counts at use time.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CAR_CLASSIFIER_HOME"
DEFAULT_MODEL = "efficientnet_lite0_cars"
DEFAULT_ARCHIVE = f"{DEFAULT_MODEL}_v1.0.mar"


def home() -> Path:
    """$CAR_CLASSIFIER_HOME, or the current working directory."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd()).resolve()


def config_properties() -> Path:
    """TorchServe's configuration: the base of every serving profile (serving/torchserve.py)."""
    return home() / "config.properties"


def models_dir() -> Path:
    """Exports (training.export's folders): the committed default one and others."""
    return home() / "models"


def default_export() -> Path:
    return models_dir() / DEFAULT_MODEL


def model_store() -> Path:
    """Built .mar archives (build-mar's output, TorchServe's model store)."""
    return home() / "model_store"


def var_dir() -> Path:
    """Run-time state and outputs, never committed."""
    return home() / "var"


def run_dir() -> Path:
    """`serve`'s TorchServe state: rendered config, logs, pid, snapshots."""
    return var_dir() / "run"


def mlruns() -> Path:
    """The local MLflow store (unless $MLFLOW_TRACKING_URI names another)."""
    return home() / "mlruns"
