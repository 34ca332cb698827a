"""The two archives compared, built from the same export (the same .pth file).

* ours:  serving.archive (what `build-mar` runs) - this project's handler, model-config.yaml and
  the export's serving files, with the worker and handler settings given.
* stock: torch-model-archiver --handler image_classifier - TorchServe's own image classifier,
  with a model file defining a no-argument nn.Module (what TorchServe's eager path instantiates
  before loading the state_dict from --serialized-file) and the export's index_to_name.json.
  Of a model with a box head it serves the classifier alone, on the whole image.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from bench.common import ROOT, BenchError
from carmodel.export import ExportDir
from handler.settings import HandlerSettings, WorkerSettings
from serving import archive

VERSION = "1.0"
STOCK_HANDLER = "image_classifier"
STOCK_MODEL_FILE = "stock_cars_net.py"  # imported by module name inside the worker: keep it unique

# How the stock model file builds each architecture: (import line, expression).
TORCHVISION_BUILD = ("import torchvision", 'torchvision.models.get_model("{arch}", weights=None, num_classes={n})')
STOCK_BUILDERS = {
    "efficientnet_lite0": ("import timm", 'timm.create_model("efficientnet_lite0", pretrained=False, num_classes={n})'),
}

STOCK_MODEL_TEMPLATE = '''"""{arch}, {n} classes, for TorchServe's stock eager loader. Written by bench/archives.py."""

from torch import nn

{import_line}


class CarsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = {build}

    def forward(self, x):
        return self.net(x)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # The export holds the bare network's state_dict, or a Localizer's: the network under "net."
        # and a box head, which the stock handler has no use for (it classifies the whole image).
        if any(key.startswith("net.") for key in state_dict):
            state_dict = {{key[4:]: value for key, value in state_dict.items() if key.startswith("net.")}}
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
'''


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"{what} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def build_ours(export: ExportDir, store: Path, workers: WorkerSettings, handler: HandlerSettings) -> tuple[str, str]:
    """serving.archive's build, as `build-mar --export ... --force` with these settings; (model name, archive file)."""
    try:
        target = archive.build_from(export, store, VERSION, workers, handler, force=True)
    except archive.BuildError as err:
        raise BenchError(f"build-mar for {export.path}: {err}") from err
    return export.model_name, target.name


def stock_model_file(arch: str, num_classes: int) -> str:
    import_line, build = STOCK_BUILDERS.get(arch, TORCHVISION_BUILD)
    return STOCK_MODEL_TEMPLATE.format(
        arch=arch, n=num_classes, import_line=import_line, build=build.format(arch=arch, n=num_classes)
    )


def build_stock(export: ExportDir, store: Path) -> tuple[str, str]:
    name = export.model_name
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / STOCK_MODEL_FILE
        model_file.write_text(stock_model_file(export.model_config.arch, len(export.classes())))
        cmd = [
            str(archive.ARCHIVER),
            *("--model-name", name, "--version", VERSION, "--handler", STOCK_HANDLER),
            *("--model-file", str(model_file), "--serialized-file", str(export.weights)),
            # the stock handler reads index_to_name.json, the same file and name as the export's
            *("--extra-files", str(export.classes_file), "--export-path", str(store), "--force"),
        ]
        _run(cmd, "torch-model-archiver (stock)")
    return name, f"{name}.mar"
