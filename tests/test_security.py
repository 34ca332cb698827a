"""What the archive may contain, and what a weights file may do: nothing but hold tensors.

(The network side of security - loopback sockets, tokens, the model API, refused registrations -
is in test_hardened.py and test_serving.py.)
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import DEFAULT_EXPORT, python

from carmodel.export import ExportDir

DEFAULT = "efficientnet_lite0_cars"


class RunsCodeWhenUnpickled:
    """A pickle payload: full unpickling would call touch(sentinel). weights_only must refuse it."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


@pytest.fixture
def poisoned_export(tmp_path) -> tuple[Path, Path]:
    """The default export with a .pth that carries code next to the real tensors."""
    export = tmp_path / "export"
    export.mkdir()
    for name in ("model.yaml", "index_to_name.json"):
        shutil.copy(DEFAULT_EXPORT / name, export / name)
    sentinel = tmp_path / "code-ran"
    state = torch.load(DEFAULT_EXPORT / f"{DEFAULT}.pth", weights_only=True)
    torch.save({**state, "payload": RunsCodeWhenUnpickled(sentinel)}, export / f"{DEFAULT}.pth")
    return export, sentinel


# The modules the handler imports, and nothing else of the repository: no training code, no
# archive/lifecycle tooling, no registry client (the archive builder finds these from the imports).
HANDLER_MODULES = {
    *(
        f"carmodel/{name}.py"
        for name in (
            "__init__",
            "calibration",
            "config",
            "detection",
            "errors",
            "export",
            "images",
            "models",
            "predictor",
        )
    ),
    *(f"carmodel/{name}.py" for name in ("presets", "runners", "typed", "vehicles")),
    *(f"handler/{name}.py" for name in ("__init__", "chain", "grpc_calls", "inputs", "metrics", "oip", "settings")),
}


def test_mar_holds_exactly_what_the_build_put_there(model_store):
    expected = {
        "MAR-INF/MANIFEST.json",
        "models.py",  # --model-file: carmodel/models.py
        "car_handler.py",  # --handler: handler/car_handler.py
        f"{DEFAULT}.pth",
        "model-config.yaml",
        "index_to_name.json",
        "model.yaml",  # ModelConfig only: no training config, data paths or tune addresses
        "calibration.json",  # the temperature and thresholds fitted on val
        *HANDLER_MODULES,
        *(p.name for p in DEFAULT_EXPORT.glob(f"{DEFAULT}_int8.*")),  # the calibrated int8 model, if exported
        *(p.name for p in DEFAULT_EXPORT.glob(f"{DEFAULT}_detector_int8.*")),  # the detector's, if exported
    }
    with zipfile.ZipFile(model_store / f"{DEFAULT}_v1.0.mar") as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        assert mar.read("handler/inputs.py") == Path("handler/inputs.py").read_bytes()
        assert mar.read("car_handler.py") == Path("handler/car_handler.py").read_bytes()
    assert names == expected, names ^ expected  # no __pycache__, tests, data, keys or stray files
    assert manifest["model"]["handler"] == "car_handler.py"
    assert manifest["model"]["serializedFile"] == f"{DEFAULT}.pth"


def test_weights_with_code_never_run_when_loaded(poisoned_export):
    export, sentinel = poisoned_export
    with pytest.raises(pickle.UnpicklingError):
        ExportDir(export).load_model("cpu")  # what the handler calls
    assert not sentinel.exists()


def test_build_refuses_weights_with_code(poisoned_export, tmp_path):
    export, sentinel = poisoned_export
    store = tmp_path / "store"
    result = python("-m", "serving.archive", "--export", str(export), "--model_store", str(store))
    assert result.returncode == 2 and "not a plain state_dict" in result.stderr, result.stderr
    assert not sentinel.exists()
    assert not store.exists() or not list(store.glob("*.mar"))
