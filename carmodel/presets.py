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

import math

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

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
        downscale_prob: float = 0.0,
        downscale_sizes: tuple[int, int] = (48, 160),
        photo_conditions_prob: float = 0.0,
    ):
        steps = [v2.ToImage()]
        if downscale_prob > 0:
            steps.append(Downscale(downscale_prob, downscale_sizes))
        steps += [
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
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if photo_conditions_prob > 0:
            steps.append(v2.RandomApply([photo_conditions()], p=photo_conditions_prob))
        steps.append(v2.Normalize(mean=mean, std=std))
        self.transforms = v2.Compose(steps)

    def __call__(self, img):
        return self.transforms(img)


class Downscale:
    """Resolution augmentation: with probability `p`, shrink the image so that its longer side is a
    random length in `sizes` (never enlarging it). The crop that follows scales it back up, as
    serving scales up a thumbnail or a car far away in a photo, so small and large inputs look
    alike to the network."""

    def __init__(self, p: float, sizes: tuple[int, int]):
        self.p, self.sizes = p, sizes

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p < 1 and torch.rand(()) >= self.p:  # p 1: every image, and no draw spent on deciding
            return img
        height, width = img.shape[-2:]
        scale = int(torch.randint(self.sizes[0], self.sizes[1] + 1, ())) / max(height, width)
        if scale >= 1:
            return img
        return F.resize(img, [max(1, round(height * scale)), max(1, round(width * scale))], antialias=True)


def photo_conditions() -> v2.RandomChoice:
    """One of the conditions people take photos in, at a random strength, on a float image in [0, 1]:
    dusk (darker, flatter, grainy), out of focus, a small sensor's grain, heavy JPEG, washed-out colour.
    Deliberately not training/corruptions.py's functions (brightness scaling, not gamma; random, not
    fixed strengths): the corruption benchmark then measures robustness, not a memorised transform."""
    dusk = v2.Compose(
        [v2.ColorJitter(brightness=(0.15, 0.7), contrast=(0.4, 0.9)), v2.GaussianNoise(sigma=0.03, clip=True)]
    )
    jpeg = v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.JPEG((5, 50)), v2.ToDtype(torch.float32, scale=True)])
    return v2.RandomChoice(
        [
            dusk,
            v2.GaussianBlur(9, sigma=(0.5, 3.0)),
            v2.GaussianNoise(sigma=0.08, clip=True),
            jpeg,
            v2.ColorJitter(saturation=(0.0, 0.5)),
        ]
    )


class LocatePresetTrain:
    """(uint8 image, the car's box in its pixels) -> (normalised `size` square of the whole image,
    the box as fractions of it), flipped at random with its box."""

    def __init__(self, *, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip_prob: float = 0.5):
        self.size = size
        self.transforms = v2.Compose(
            [
                v2.RandomHorizontalFlip(hflip_prob),
                v2.Resize((size, size), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=mean, std=std),
            ]
        )

    def __call__(self, img: torch.Tensor, box) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor([box], dtype=torch.float32), format="XYXY", canvas_size=tuple(img.shape[-2:])
        )
        img, boxes = self.transforms(tv_tensors.Image(img), boxes)
        return img.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor)[0].float() / self.size


def widen(box, margins, width: int, height: int) -> tuple[int, int, int, int]:
    """`box` (x1, y1, x2, y2) widened by `margins` (left, top, right, bottom; fractions of the box's
    size, negative narrows), in whole pixels inside a `width` x `height` image, never empty."""
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    left = min(max(int(x1 - margins[0] * w), 0), width - 1)
    top = min(max(int(y1 - margins[1] * h), 0), height - 1)
    right = max(min(round(x2 + margins[2] * w), width), left + 1)
    bottom = max(min(round(y2 + margins[3] * h), height), top + 1)
    return left, top, right, bottom


def cut_out(img, box, margins=(0.0, 0.0, 0.0, 0.0)):
    """The part of `img` (PIL image or CHW tensor) inside `box` (pixels) widened by `margins`."""
    width, height = F.get_size(img)[::-1]
    left, top, right, bottom = widen(box, margins, width, height)
    return F.crop(img, top, left, bottom - top, right - left)


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
    """`augment`: training's augmentation settings (train_size, hflip_prob, auto_augment, min_crop_scale,
    downscaling, photo conditions);
    `model`: a ModelConfig (or anything with mean and std)."""
    return ClassificationPresetTrain(
        crop_size=augment.train_size,
        mean=model.mean,
        std=model.std,
        hflip_prob=augment.hflip_prob,
        auto_augment=augment.auto_augment,
        min_crop_scale=augment.min_crop_scale,
        downscale_prob=augment.downscale_prob,
        downscale_sizes=(augment.downscale_min, augment.downscale_max),
        photo_conditions_prob=augment.photo_conditions_prob,
    )


def eval_preset(cfg) -> ClassificationPresetEval:
    """`cfg`: a ModelConfig (or anything with eval_size, mean and std)."""
    return ClassificationPresetEval(size=cfg.eval_size, mean=cfg.mean, std=cfg.std)


# A localising model cuts the car out of the decoded image: decode large enough for a car that spans
# this share of the image's shorter side to reach the classifier with all of its eval-size pixels.
CAR_SHARE_AT_FULL_DETAIL = 2 / 3


def decode_side(cfg) -> int:
    """The shorter side an image is decoded to, at least (carmodel.images): the model never sees more.
    `cfg`: a ModelConfig. A 4032x3024 JPEG decodes at 1/8 scale (504x378) for the shipped model."""
    if not cfg.localizes:
        return cfg.eval_size  # the whole image is squashed to eval_size x eval_size
    return math.ceil(cfg.eval_size / CAR_SHARE_AT_FULL_DETAIL)


def locate_preset(cfg) -> ClassificationPresetEval:
    """The whole image squashed to the model's `locate_size`, to find the car in."""
    return ClassificationPresetEval(size=cfg.locate_size, mean=cfg.mean, std=cfg.std)
