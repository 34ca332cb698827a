"""The two archives compared, built from the same export (the same .pth file).

* ours:  scripts/build_mar.py - this project's handler, model-config.yaml, packed training code.
* stock: torch-model-archiver --handler image_classifier - TorchServe's own image classifier,
  with a model file defining a no-argument nn.Module (what TorchServe's eager path instantiates
  before loading the state_dict from --serialized-file) and the export's index_to_name.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, BenchError
from training import config as config_lib

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
        # The export holds the bare network's state_dict (no "net." prefix).
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
'''


def _archiver() -> str:
    return str(Path(sys.executable).parent / "torch-model-archiver")


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"{what} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def build_ours(export: Path, store: Path, settings: dict[str, int]) -> tuple[str, str]:
    """scripts/build_mar.py; `settings` (workers, batch_size, max_batch_delay) are passed through when given."""
    model_name = config_lib.load(export / "config.yaml").model_name
    flags = [x for key, value in settings.items() if value is not None for x in (f"--{key}", str(value))]
    cmd = [sys.executable, "scripts/build_mar.py", "--export", str(export), "--model_store", str(store)]
    _run([*cmd, "--version", VERSION, "--force", *flags], "scripts/build_mar.py")
    return model_name, f"{model_name}_v{VERSION}.mar"


def stock_model_file(arch: str, num_classes: int) -> str:
    import_line, build = STOCK_BUILDERS.get(arch, TORCHVISION_BUILD)
    return STOCK_MODEL_TEMPLATE.format(
        arch=arch, n=num_classes, import_line=import_line, build=build.format(arch=arch, n=num_classes)
    )


def build_stock(export: Path, store: Path) -> tuple[str, str]:
    cfg = config_lib.load(export / "config.yaml")
    num_classes = len(json.loads((export / "index_to_name.json").read_text()))
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / STOCK_MODEL_FILE
        model_file.write_text(stock_model_file(cfg.arch, num_classes))
        cmd = [
            _archiver(),
            *("--model-name", cfg.model_name, "--version", VERSION, "--handler", STOCK_HANDLER),
            *("--model-file", str(model_file), "--serialized-file", str(export / f"{cfg.model_name}.pth")),
            *("--extra-files", str(export / "index_to_name.json"), "--export-path", str(store), "--force"),
        ]
        _run(cmd, "torch-model-archiver (stock)")
    return cfg.model_name, f"{cfg.model_name}.mar"
