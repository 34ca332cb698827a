"""Image transforms, after torchvision's references/classification/presets.py.

`ClassificationPresetEval` is the only definition of inference preprocessing in the project:
training's evaluation, the predictor (carmodel/predictor.py) and so the TorchServe handler all
take it from here, so evaluation and serving can never drift apart.

Stanford Cars images are cropped to the car, so they are wide (about 2:1). Evaluation squashes
the whole image to a square instead of centre-cropping it, which would cut off the front and the
back of the car - the parts that tell one model year from the next. Training crops with a wide
range of aspect ratios so that the squash it sees matches the one at evaluation.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from carmodel.config import IMAGENET_MEAN, IMAGENET_STD

_AUTO_AUGMENT = {
    "ta_wide": lambda interp: v2.TrivialAugmentWide(interpolation=interp),
    "autoaugment": lambda interp: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=interp),
    "randaugment": lambda interp: v2.RandAugment(interpolation=interp),
}


class ClassificationPresetTrain:
    def __init__(
        self,
        *,
        crop_size: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation=InterpolationMode.BILINEAR,
        hflip_prob: float = 0.5,
        auto_augment: str = "none",
        min_crop_scale: float = 0.35,
    ):
        steps = [
            v2.ToImage(),
            v2.RandomResizedCrop(
                crop_size,
                scale=(min_crop_scale, 1.0),
                ratio=(3 / 4, 5 / 2),
                interpolation=interpolation,
                antialias=True,
            ),
        ]
        if hflip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(hflip_prob))
        if auto_augment != "none":
            if auto_augment not in _AUTO_AUGMENT:
                raise ValueError(f"auto_augment must be one of none, {', '.join(_AUTO_AUGMENT)}; got {auto_augment!r}")
            steps.append(_AUTO_AUGMENT[auto_augment](interpolation))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
        self.transforms = v2.Compose(steps)

    def __call__(self, img):
        return self.transforms(img)


class ClassificationPresetEval:
    """PIL image or uint8 tensor (C, H, W) -> normalised float tensor (3, size, size)."""

    def __init__(self, *, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=InterpolationMode.BILINEAR):
        self.size = size
        self.transforms = v2.Compose(
            [
                v2.ToImage(),
                # Resize while still uint8: it is several times cheaper than on floats.
                v2.Resize((size, size), interpolation=interpolation, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=mean, std=std),
            ]
        )

    def __call__(self, img):
        return self.transforms(img)


def train_preset(augment, model) -> ClassificationPresetTrain:
    """`augment`: training's augmentation settings (train_size, hflip_prob, auto_augment, min_crop_scale);
    `model`: a ModelConfig (or anything with mean and std)."""
    return ClassificationPresetTrain(
        crop_size=augment.train_size,
        mean=model.mean,
        std=model.std,
        hflip_prob=augment.hflip_prob,
        auto_augment=augment.auto_augment,
        min_crop_scale=augment.min_crop_scale,
    )


def eval_preset(cfg) -> ClassificationPresetEval:
    """`cfg`: a ModelConfig (or anything with eval_size, mean and std)."""
    return ClassificationPresetEval(size=cfg.eval_size, mean=cfg.mean, std=cfg.std)
