"""The export folder: the one definition of what a trained model is on disk.

    <name>.pth             state_dict only (torch.load(..., weights_only=True)); <name> = <arch>_cars
    index_to_name.json     {"0": "AM General Hummer SUV 2000", ...}: official names
    model.yaml             ModelConfig: architecture and preprocessing, all that inference needs
    <name>_int8.xml/.bin   optional: the calibrated int8 OpenVINO model (training.quantize)
    <name>_detector_int8.xml/.bin  optional: the same for the car detector's pass (a model with a detector)
    calibration.json       optional: temperature and thresholds fitted on val (carmodel/calibration.py)
    -- training's record, kept beside them, never shipped to a server --
    config.yaml, metrics.json, split.json, quantization.json, curves.png, ...

An unpacked .mar holds the serving files (`ExportDir.serving_files`) in its root, so the handler
reads it with this same class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from carmodel.calibration import CALIBRATION, Calibration
from carmodel.config import ModelConfig
from carmodel.models import build_for

MODEL_CONFIG = "model.yaml"
CLASSES = "index_to_name.json"
TRAINING_CONFIG = "config.yaml"
METRICS = "metrics.json"
SPLIT = "split.json"
QUANTIZATION = "quantization.json"
REGISTERED_VERSION = "registered_version"  # the registry version of an export fetched from it


class ExportError(ValueError):
    pass


@dataclass(frozen=True)
class ExportDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------ names

    @cached_property
    def model_config(self) -> ModelConfig:
        file = self.path / MODEL_CONFIG
        if not file.is_file():
            raise ExportError(f"{file} missing: not an export directory (python -m training.export makes one)")
        try:
            return ModelConfig.load(file)
        except (ValueError, TypeError) as err:
            message = str(err)
            raise ExportError(message if message.startswith(str(file)) else f"{file}: {message}") from err

    @property
    def model_name(self) -> str:
        return self.model_config.model_name

    @property
    def weights(self) -> Path:
        return self.path / f"{self.model_name}.pth"

    @property
    def classes_file(self) -> Path:
        return self.path / CLASSES

    @property
    def int8_xml(self) -> Path:
        return self.path / f"{self.model_name}_int8.xml"

    @property
    def int8_files(self) -> list[Path]:
        return openvino_files(self.int8_xml)

    @property
    def calibration_file(self) -> Path:
        return self.path / CALIBRATION

    @property
    def has_int8(self) -> bool:
        return all(p.is_file() for p in self.int8_files)

    @property
    def detector_int8_xml(self) -> Path:
        return self.path / f"{self.model_name}_detector_int8.xml"

    @property
    def detector_int8_files(self) -> list[Path]:
        return openvino_files(self.detector_int8_xml)

    @property
    def has_detector_int8(self) -> bool:
        return all(p.is_file() for p in self.detector_int8_files)

    def record(self, name: str) -> Path:
        """One of training's record files (METRICS, SPLIT, TRAINING_CONFIG, ...)."""
        return self.path / name

    def serving_files(self, with_int8: bool = True) -> list[Path]:
        """What a server needs from this export: the archive packs exactly these."""
        files = [self.path / MODEL_CONFIG, self.classes_file, self.weights]
        files += [self.calibration_file] if self.calibration_file.is_file() else []
        files += self.int8_files if with_int8 and self.has_int8 else []
        return files + (self.detector_int8_files if with_int8 and self.has_detector_int8 else [])

    # ------------------------------------------------------------------ read

    def classes(self) -> list[str]:
        mapping = json.loads(self.classes_file.read_text())
        return [mapping[str(i)] for i in range(len(mapping))]

    def calibration(self) -> Calibration:
        """How the answer is calibrated (the identity where the export has no calibration.json)."""
        try:
            return Calibration.load(self.calibration_file)
        except (ValueError, TypeError) as err:
            raise ExportError(str(err)) from err

    def validate(self, model_name: str | None = None) -> None:
        """Everything a server needs is here and sound; raises ExportError saying what is not."""
        if not self.path.is_dir():
            raise ExportError(f"export directory not found: {self.path} (run training.export first)")
        expected = self.model_name
        if model_name and model_name != expected:
            raise ExportError(
                f"{self.path} holds a {self.model_config.arch} model, which is served as {expected!r}, "
                f"not {model_name!r}"
            )
        for path in (self.classes_file, self.weights):
            if not path.is_file():
                raise ExportError(f"{path} missing: not a complete export")
        check_weights(self.weights)

    def load_model(self, device="cpu") -> torch.nn.Module:
        """The network in eval mode. weights_only=True: a .pth may hold tensors, never code."""
        cfg = self.model_config
        model, _ = build_for(cfg, len(self.classes()))
        model.load_state_dict(torch.load(self.weights, map_location=device, weights_only=True))
        return model.to(device).eval()

    # ------------------------------------------------------------------ write

    def save(self, model: torch.nn.Module, classes: list[str], model_config: ModelConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        model_config.save(self.path / MODEL_CONFIG)
        self.__dict__.pop("model_config", None)  # re-read from the file just written
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, self.weights)
        self.classes_file.write_text(json.dumps({str(i): n for i, n in enumerate(classes)}, indent=1))


def openvino_files(xml: Path) -> list[Path]:
    """An OpenVINO model's two files: the graph (.xml) and its weights (.bin)."""
    return [xml, xml.with_suffix(".bin")]


def check_weights(weights: Path) -> None:
    """Tensors only: a .pth that needs full unpickling could carry code, and the worker
    (weights_only=True) would refuse it at load anyway. Fail when packing, not on the server."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError for a corrupt zip, ...
        raise ExportError(f"{weights} is not a plain state_dict ({type(err).__name__}): refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"{weights} is not a state_dict of tensors: refused")
