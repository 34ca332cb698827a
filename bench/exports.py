"""The export directory (carmodel.export.ExportDir) benchmarked for a model name.

`models/<name>` when the project ships it; otherwise, for `<arch>_cars`, an export with random
weights made once into var/bench/exports/ - speed does not depend on what the weights learned.
Its classes and preprocessing follow the shipped model's, with the arch swapped, and it gets an
int8 model calibrated on real training photos (training.quantize, no accuracy check: the weights
are random), so the fast path it is served with is the one a trained export gets.
"""

from __future__ import annotations

import dataclasses
import shutil

import torch

from bench.common import BENCH_VAR, MODELS_DIR, BenchError
from carmodel.export import TRAINING_CONFIG, ExportDir, ExportError
from carmodel.models import ARCHS, build_for
from carmodel.paths import DEFAULT_MODEL

RANDOM_EXPORTS = BENCH_VAR / "exports"
TEMPLATE_EXPORT = ExportDir(MODELS_DIR / DEFAULT_MODEL)  # class names and preprocessing
RANDOM_EVAL_SIZE = 224  # the size the stock handler feeds every model (Resize 256 + CenterCrop 224)
SEED = 0
CALIBRATION_IMAGES = 300  # speed does not depend on how many; accuracy is not measured for random weights
NAME_SUFFIX = "_cars"


def is_complete(export: ExportDir) -> bool:
    try:
        export.validate()
    except ExportError:
        return False
    return True


def resolve_export(model_name: str) -> ExportDir:
    shipped = ExportDir(MODELS_DIR / model_name)
    if is_complete(shipped):
        return shipped
    arch = model_name.removesuffix(NAME_SUFFIX)
    if not model_name.endswith(NAME_SUFFIX) or arch not in ARCHS:
        raise BenchError(f"no export for {model_name!r}: not in {MODELS_DIR}, and not <arch>_cars for {list(ARCHS)}")
    export = ExportDir(RANDOM_EXPORTS / model_name)
    if not is_complete(export):
        make_random_export(arch, export)
    if not export.has_int8:
        calibrate_int8(export)
    return export


def calibrate_int8(export: ExportDir) -> None:
    from training.data import DatasetError
    from training.quantize import quantize_export

    try:
        report = quantize_export(export, None, CALIBRATION_IMAGES, max_loss=1.0, evaluate=False)
    except (ImportError, DatasetError) as err:  # no nncf, or no photos: served as bf16/fp32 instead
        print(f"{export.path.name}: no int8 model ({err}); the fast path falls back to bf16/fp32")
        return
    print(
        f"{export.path.name}: int8 calibrated on {report['calibration_images']} training photos "
        f"in {report['seconds']} s"
    )


def make_random_export(arch: str, export: ExportDir) -> ExportDir:
    """Random weights of a plain classifier (no box or car head: the original recipe's shape), the
    template's classes and preprocessing, saved by ExportDir itself. The template's training
    config.yaml is copied as it is: int8 calibration reads the photos (data root, split) from it; the
    export's architecture is model.yaml's, not that record's."""
    if not is_complete(TEMPLATE_EXPORT):
        raise BenchError(f"{TEMPLATE_EXPORT.path} is needed for the class names and preprocessing")
    classes = TEMPLATE_EXPORT.classes()
    model_config = dataclasses.replace(
        TEMPLATE_EXPORT.model_config, arch=arch, eval_size=RANDOM_EVAL_SIZE, locate_size=0, car_head=False
    )
    torch.manual_seed(SEED)
    model, _ = build_for(model_config, len(classes))
    export.save(model, classes, model_config)
    shutil.copy(TEMPLATE_EXPORT.record(TRAINING_CONFIG), export.record(TRAINING_CONFIG))
    return export
