"""Architectures, their heads, and loading their weights.

* resnet50, efficientnet_b0, mobilenet_v2: torchvision's architectures;
* efficientnet_lite0, efficientnet_lite1, efficientnet_lite2: timm's (Lite1/Lite2: larger teachers).

`pretrained` is "none" (random, on purpose) or a path to a weights file (a run's best.pth, an
export's). Where the trainable blocks are is part of each architecture (`ArchSpec.blocks`); which of
them train, and the ImageNet init, are training's (training/model.py).
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
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> the trunk's last feature map
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # that feature map -> logits
    # images -> the feature maps at strides 8, 16 and 32 that the car detector reads (None: no detector)
    pyramid: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]] | None = None
    pyramid_channels: tuple[int, ...] = ()


def _pooled_classifier(m, f):
    return m.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def _torchvision(name: str, head: str, blocks, features, classify=_pooled_classifier):
    import torchvision

    def build(num_classes: int, dropout: float) -> nn.Module:
        kwargs = {"dropout": dropout} if name != "resnet50" else {}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return ArchSpec(build, head, blocks, features, classify)


def _resnet_features(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _resnet_classify(m, f):
    return m.fc(torch.flatten(m.avgpool(f), 1))


def _resnet_blocks(m) -> list[nn.Module]:
    stem = nn.ModuleList([m.conv1, m.bn1])
    return [stem, *m.layer1, *m.layer2, *m.layer3, *m.layer4]


def _lite(name: str, pyramid_channels: tuple[int, int, int]) -> ArchSpec:
    def build(num_classes: int, dropout: float) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=dropout)

    return ArchSpec(
        build,
        "classifier",
        _lite_blocks,
        lambda m, x: m.forward_features(x),
        lambda m, f: m.forward_head(f),
        _lite_pyramid,
        pyramid_channels,
    )


def _lite_blocks(m) -> list[nn.Module]:
    return [nn.ModuleList([m.conv_stem, m.bn1]), *m.blocks, nn.ModuleList([m.conv_head, m.bn2])]


def _lite_pyramid(m, x) -> list[torch.Tensor]:
    """The outputs of blocks 2, 4 and 6 (strides 8, 16, 32; Lite0: 40, 112, 320 channels); the 1x1
    head convolution that only classification needs is skipped."""
    x = m.bn1(m.conv_stem(x))
    levels = []
    for index, block in enumerate(m.blocks):
        x = block(x)
        if index in (2, 4, 6):
            levels.append(x)
    return levels


ARCHS: dict[str, ArchSpec] = {
    "resnet50": _torchvision("resnet50", "fc", _resnet_blocks, _resnet_features, _resnet_classify),
    "efficientnet_b0": _torchvision(
        "efficientnet_b0", "classifier.1", lambda m: list(m.features), lambda m, x: m.features(x)
    ),
    "mobilenet_v2": _torchvision(
        "mobilenet_v2", "classifier.1", lambda m: list(m.features), lambda m, x: m.features(x)
    ),
    "efficientnet_lite0": _lite("efficientnet_lite0", (40, 112, 320)),
    "efficientnet_lite1": _lite("efficientnet_lite1", (40, 112, 320)),
    "efficientnet_lite2": _lite("efficientnet_lite2", (48, 120, 352)),
}


def spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def load_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"cannot load weights from {path}: {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    return state


def load_trunk(model: nn.Module, state: dict, head: str) -> None:
    """Load everything but a head whose shape does not fit (an ImageNet head on a cars model)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(head + ".") and v.shape != own[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head + ".") for k in missing):
        raise PretrainedWeightsError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


class GridHead(nn.Module):
    """The trunk's last feature map -> `outputs` numbers: the car's box (x1, y1, x2, y2) as fractions
    of the input's width and height, or the car/no-car logit. Pooled to a small grid rather than to
    one vector: where the car is, and whether its parts sit where a car's do, lives in the map's
    layout, which global pooling throws away."""

    def __init__(self, channels: int, outputs: int, width: int = 64, grid: int = 4, hidden: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(grid),
            nn.Flatten(),
            nn.Linear(width * grid * grid, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, outputs),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Localizer(nn.Module):
    """A classifier (`net`, unchanged) with a box head on its trunk: forward -> (logits, box), and
    with `car_head` -> (logits, box, car logit), the car logit saying whether what it sees is a car.
    With `detector`, `detect` finds every car (carmodel.detection) from the same trunk's pyramid.

    The predictor runs the trunk twice: on the whole photo to find the cars (the detector; without one,
    small for the box and the car logit), and at eval size on each car cut from the upload for its class
    (and, with a detector, the car logit: the car check)."""

    def __init__(self, net: nn.Module, arch: str, car_head: bool = False, detector: bool = False):
        super().__init__()
        self.arch = arch
        self.net = net
        channels = head_module(net, arch).in_features
        self.box_head = GridHead(channels, 4)
        self.car_head = GridHead(channels, 1) if car_head else None
        self.detector = None
        if detector:
            from carmodel.detection import CarDetector  # torchvision's detection modules, only where used

            if spec(arch).pyramid is None:
                raise ValueError(f"{arch} has no feature pyramid for a car detector (ArchSpec.pyramid)")
            self.detector = CarDetector(spec(arch).pyramid_channels)

    def detect(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Canvases -> the detector's car logits, box regression and centre-ness (carmodel.detection)."""
        return self.detector(spec(self.arch).pyramid(self.net, x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = spec(self.arch)
        features = s.features(self.net, x)
        outputs = s.classify(self.net, features), self.box_head(features)
        if self.car_head is None:
            return outputs
        return *outputs, self.car_head(features).squeeze(1)


class DetectPass(nn.Module):
    """A Localizer's detector as a network of its own (what a runner compiles): canvases -> its outputs."""

    def __init__(self, localizer: Localizer):
        super().__init__()
        self.localizer = localizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.localizer.detect(x)


def build_model(
    arch: str,
    num_classes: int,
    pretrained: str = "none",
    dropout: float = 0.2,
    locate: bool = False,
    car_head: bool = False,
    detector: bool = False,
) -> tuple[nn.Module, str]:
    """Returns (model, description of the init that was used). `locate`: a `Localizer` around the
    classifier (with a car/no-car head: `car_head`; with a car detector: `detector`); a weights file
    of a classifier initialises its `net`, one of a Localizer all of it (but the heads it lacks)."""
    s = spec(arch)
    model = s.build(num_classes, dropout)
    if locate:
        model = Localizer(model, arch, car_head, detector)
    if pretrained == "none":
        init = "random (pretrained=none)"
    else:
        state = load_weights_file(Path(pretrained))
        if locate and any(k.startswith("box_head.") for k in state):
            load_localizer(model, state)
        else:
            load_trunk(base_net(model), state, s.head)
        init = f"file:{pretrained}"
    log.info("model %s%s: %d classes, init %s", arch, " + box head" if locate else "", num_classes, init)
    return model, init


def build_for(config, num_classes: int, pretrained: str = "none") -> tuple[nn.Module, str]:
    """`build_model` for a carmodel.config.ModelConfig: its architecture and heads."""
    return build_model(
        config.arch,
        num_classes,
        pretrained,
        config.dropout,
        locate=config.localizes,
        car_head=config.car_head,
        detector=config.detects,
    )


def load_localizer(model: Localizer, state: dict) -> None:
    """A Localizer's weights; a car head or detector that the file lacks stays as initialised
    (training.detector and training.verifier train them)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("car_head.", "detector.")) for k in missing):
        raise PretrainedWeightsError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def base_net(model: nn.Module) -> nn.Module:
    """The classifier itself: `model`, or the one inside a Localizer."""
    return model.net if isinstance(model, Localizer) else model


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    return base_net(model).get_submodule(spec(arch).head)
