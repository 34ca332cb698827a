"""The served network, for TorchServe's eager-model path (the .mar's --model-file).

TorchServe's stock loader instantiates the one class in the model file with no arguments and
calls torch.load without weights_only. Ours builds the architecture named in the export's
config.yaml with training.model (one definition of the network, shared with training) and
loads the state_dict with weights_only=True: a .pth can then hold tensors, never code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training import config as config_lib
from training.model import build_model


def load_model(model_dir: str | Path, weights_path: str | Path, device) -> torch.nn.Module:
    model_dir = Path(model_dir)
    cfg = config_lib.load(model_dir / "config.yaml")
    classes = json.loads((model_dir / "index_to_name.json").read_text())
    model, _ = build_model(cfg.arch, len(classes), "none", cfg.dropout)
    model.load_state_dict(torch.load(weights_path, map_location=device, weights_only=True))
    return model.eval()
