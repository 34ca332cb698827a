"""Ordinary photo conditions, at three severities each: what `training.evaluate --corruptions` puts the
held-out crops through, so that accuracy and calibration are measured where people take photos, not
only where Stanford Cars' framing is (in the spirit of ImageNet-C, Hendrycks & Dietterich, 2019).

    low_light   dusk: darker (gamma), flatter (contrast), with the sensor noise a dark photo has
    blur        out of focus or moving: a Gaussian blur, its width a share of the photo's size
    noise       a small sensor's grain: Gaussian noise
    jpeg        heavy compression, as messengers and web pages recompress
    downscale   a thumbnail: the longer side shrunk to a few dozen pixels
    grayscale   a black-and-white photo, or colour washed out

Each is deterministic per image (its noise seeded from the image's own pixels), so two evaluations of
one model give the same figures. Severity 2 is the middle one the targets speak of.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

SEVERITIES = (1, 2, 3)


def _seed(image: Image.Image) -> int:
    return zlib.crc32(image.tobytes()[:4096])


def _noisy(tensor: torch.Tensor, sigma: float, image: Image.Image) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed(image))
    return (tensor + sigma * torch.randn(tensor.shape, generator=generator)).clamp(0, 1)


def low_light(image: Image.Image, severity: int) -> Image.Image:
    gamma, contrast, noise = {1: (1.6, 0.8, 0.02), 2: (2.2, 0.65, 0.035), 3: (3.0, 0.5, 0.05)}[severity]
    tensor = F.adjust_contrast(F.adjust_gamma(F.to_image(image).float() / 255, gamma), contrast)
    return F.to_pil_image(_noisy(tensor, noise, image))


def blur(image: Image.Image, severity: int) -> Image.Image:
    sigma = {1: 0.005, 2: 0.01, 3: 0.02}[severity] * max(image.size)
    kernel = 2 * round(3 * sigma) + 1
    return F.to_pil_image(F.gaussian_blur(F.to_image(image), [kernel, kernel], [sigma, sigma]))


def noise(image: Image.Image, severity: int) -> Image.Image:
    sigma = {1: 0.04, 2: 0.08, 3: 0.14}[severity]
    return F.to_pil_image(_noisy(F.to_image(image).float() / 255, sigma, image))


def jpeg(image: Image.Image, severity: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality={1: 25, 2: 12, 3: 6}[severity])
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def downscale(image: Image.Image, severity: int) -> Image.Image:
    side = {1: 96, 2: 64, 3: 40}[severity]
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    return small


def grayscale(image: Image.Image, severity: int) -> Image.Image:
    saturation = {1: 0.4, 2: 0.15, 3: 0.0}[severity]
    return F.to_pil_image(F.adjust_saturation(F.to_image(image), saturation))


CORRUPTIONS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "low_light": low_light,
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "downscale": downscale,
    "grayscale": grayscale,
}


def corrupt(image: Image.Image, name: str, severity: int) -> Image.Image:
    """`image` (RGB) under corruption `name` at `severity` (1-3)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    return CORRUPTIONS[name](image.convert("RGB"), severity)


def mean_relative_top1(top1: dict[str, dict[int, float]], clean: float) -> float:
    """The corruptions' mean top-1 over every severity, as a share of the clean top-1."""
    return float(np.mean([value for by_severity in top1.values() for value in by_severity.values()]) / clean)
