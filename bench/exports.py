"""The export directory (training.export's layout) benchmarked for a model name.

`models/<name>` when the project ships it; otherwise, for `<arch>_cars`, an export with random
weights made once into var/bench/exports/ - speed does not depend on what the weights learned.
Its index_to_name.json and config.yaml follow the shipped model's, with the arch swapped, and it
gets an int8 model calibrated on real training photos (training.quantize, no accuracy check: the
weights are random), so the fast path it is served with is the one a trained export gets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from bench.common import BENCH_VAR, MODELS_DIR, BenchError
from handler.fast_path import int8_model_path
from training import config as config_lib
from training.model import ARCHS, build_model

RANDOM_EXPORTS = BENCH_VAR / "exports"
TEMPLATE_EXPORT = MODELS_DIR / "efficientnet_lite0_cars"  # class names and preprocessing defaults
RANDOM_EVAL_SIZE = 224  # the size the stock handler feeds every model (Resize 256 + CenterCrop 224)
SEED = 0
CALIBRATION_IMAGES = 300  # speed does not depend on how many; accuracy is not measured for random weights
NAME_SUFFIX = "_cars"


def resolve_export(model_name: str) -> Path:
    shipped = MODELS_DIR / model_name
    if (shipped / "config.yaml").is_file():
        return shipped
    arch = model_name.removesuffix(NAME_SUFFIX)
    if not model_name.endswith(NAME_SUFFIX) or arch not in ARCHS:
        raise BenchError(f"no export for {model_name!r}: not in {MODELS_DIR}, and not <arch>_cars for {list(ARCHS)}")
    export = RANDOM_EXPORTS / model_name
    if not (export / f"{model_name}.pth").is_file():
        make_random_export(arch, export)
    if not int8_model_path(export, model_name).is_file():
        calibrate_int8(export)
    return export


def calibrate_int8(export: Path) -> None:
    from training.data import DatasetError
    from training.quantize import quantize_export

    try:
        report = quantize_export(export, None, CALIBRATION_IMAGES, max_loss=1.0, evaluate=False)
    except (ImportError, DatasetError) as err:  # no nncf, or no photos: served as bf16/fp32 instead
        print(f"{export.name}: no int8 model ({err}); the fast path falls back to bf16/fp32")
        return
    print(f"{export.name}: int8 calibrated on {report['calibration_images']} training photos in {report['seconds']} s")


def make_random_export(arch: str, export: Path) -> Path:
    """Random weights in training.export's layout: <arch>_cars.pth, index_to_name.json, config.yaml."""
    if not (TEMPLATE_EXPORT / "index_to_name.json").is_file():
        raise BenchError(f"{TEMPLATE_EXPORT} is needed for the class names")
    export.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE_EXPORT / "index_to_name.json", export / "index_to_name.json")
    overrides = {
        "arch": arch,
        "pretrained": "none",
        "eval_size": RANDOM_EVAL_SIZE,
        "extra": {"note": "random weights, made by bench/exports.py for speed measurements only"},
    }
    cfg = config_lib.load(TEMPLATE_EXPORT / "config.yaml", overrides)
    num_classes = len(json.loads((export / "index_to_name.json").read_text()))
    torch.manual_seed(SEED)
    model, _ = build_model(arch, num_classes, "none", cfg.dropout)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, export / f"{cfg.model_name}.pth")
    cfg.save(export / "config.yaml")
    return export
