"""Every car in a picture, each with its box and score: the detector on the classifier's own trunk.

torchvision's building blocks, not hand-written ones: a feature pyramid (`ops.FeaturePyramidNetwork`)
over three of the trunk's stages (strides 8, 16 and 32: ArchSpec.pyramid) and FCOS's head
(`models.detection.FCOSHead`: a car score, a centre-ness and the box's four distances at every place
of every level). torchvision's `FCOS` model around them supplies what FCOS defines besides the layers:
which place answers for which car in training (centre sampling, a size range per level) and, at
inference, the box coder. The decoding itself (the score sqrt(car x centre-ness), boxes, clipping, NMS
with `ops.batched_nms`) is FCOS's `postprocess_detections` done for a whole batch at once: the same
answer, without its Python loop over images and levels (1.5 ms an image at serving's batch of 8).

The picture is letterboxed into the model's detect canvas (ModelConfig.detect_size: width x height),
its aspect kept and the rest padded, so the network has one input shape (OpenVINO compiles it once)
and a car keeps its proportions whatever the picture's.

    canvas = Letterbox(cfg)
    tensor, scale = canvas(image)                      # (3, H, W), canvas pixels per image pixel
    outputs = model.detect(tensor[None])               # a Localizer with a detector (carmodel.models)
    found = Decoder(model.detector, cfg).cars(outputs, [canvas.content(image.size)])[0]
    found.boxes / scale, found.scores                  # in the image's pixels, best first
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, batched_nms
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

STRIDES = (8, 16, 32)  # of the pyramid's levels; FCOS's anchor size per level is its stride
SCORE_FLOOR = 0.05  # detections below this are dropped before NMS (the car threshold is calibrated above it)
PROVISIONAL_THRESHOLD = 0.5  # a car, until the calibration (training.calibrate) fits the car threshold
NMS_IOU = 0.5  # two boxes overlapping more are one car: composites keep each car at least half visible


class CarDetector(nn.Module):
    """The trunk's pyramid features -> FCOS's outputs, every level's places concatenated:
    car logits [N, A, 1], box regression [N, A, 4] and centre-ness logits [N, A, 1]."""

    def __init__(self, channels: Sequence[int], width: int = 32, num_convs: int = 2):
        super().__init__()
        self.out_channels = width  # what torchvision's FCOS asks of its backbone
        self.fpn = FeaturePyramidNetwork(list(channels), width)
        self.head = FCOSHead(width, num_anchors=1, num_classes=1, num_convs=num_convs)

    def pyramid(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.head(self.pyramid(features))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


def fcos(detector: CarDetector, max_cars: int = 100, score_floor: float = SCORE_FLOOR) -> FCOS:
    """torchvision's FCOS around `detector`: its training targets and loss (`compute_loss`) and its
    decoding and NMS (`postprocess_detections`). Its own resizing transform is never used."""
    anchors = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    return FCOS(
        detector,
        num_classes=1,
        anchor_generator=anchors,
        head=detector.head,
        score_thresh=score_floor,
        nms_thresh=NMS_IOU,
        detections_per_img=max_cars,
    )


def level_shapes(canvas: tuple[int, int]) -> list[tuple[int, int]]:
    """(height, width) of each level's map for a (width, height) canvas: stride-2 convolutions round up."""
    width, height = canvas
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def anchor_points(model: FCOS, canvas: tuple[int, int]) -> list[torch.Tensor]:
    """The places every level answers for, as FCOS's anchors (one box of the level's stride per place)."""
    width, height = canvas
    images = ImageList(torch.zeros(1, 3, height, width), [(height, width)])
    features = [torch.zeros(1, 1, h, w) for h, w in level_shapes(canvas)]
    return list(model.anchor_generator(images, features)[0].split([h * w for h, w in level_shapes(canvas)]))


@dataclass(frozen=True)
class Found:
    """The cars found in one picture: boxes [K, 4] (x1, y1, x2, y2) and scores [K], best score first."""

    boxes: torch.Tensor
    scores: torch.Tensor


class Letterbox:
    """A picture -> (normalised (3, H, W) canvas of the model's detect_size, canvas pixels per picture
    pixel): resized whole to fit, its aspect kept, at the top left; the rest is the mean colour (0)."""

    def __init__(self, cfg):
        self.width, self.height = cfg.detect_size
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])

    def scale(self, size: tuple[int, int]) -> float:
        return min(self.width / size[0], self.height / size[1])

    def content(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the picture inside the canvas: boxes are clipped to it."""
        s = self.scale(size)
        return max(1, min(self.height, round(size[1] * s))), max(1, min(self.width, round(size[0] * s)))

    def __call__(self, image) -> tuple[torch.Tensor, float]:
        size = tuple(F.get_size(image)[::-1])  # (width, height) of a PIL image or a (C, H, W) tensor
        height, width = self.content(size)
        # resize while uint8: several times cheaper than on floats
        resized = self.normalize(F.resize(F.to_image(image), [height, width], antialias=True))
        canvas = torch.zeros(3, self.height, self.width)
        canvas[:, :height, :width] = resized
        return canvas, self.scale(size)


class Decoder:
    """The network's outputs for a batch of canvases -> the cars found in each (`Found`, canvas pixels)."""

    def __init__(self, detector: CarDetector, cfg, max_cars: int = 100, score_floor: float = SCORE_FLOOR):
        self.model = fcos(detector, max_cars, score_floor)
        self.max_cars, self.score_floor = max_cars, score_floor
        self.anchors = anchor_points(self.model, cfg.detect_size)
        self.all_anchors = torch.cat(self.anchors)

    @torch.no_grad()
    def cars(
        self, outputs: Sequence[torch.Tensor], contents: Sequence[tuple[int, int]], at_least: float = 0.0
    ) -> list[Found]:
        """FCOS's decoding for a batch: every place scoring above the floor (a level never has more than
        FCOS's 1,000 candidates on a canvas this size), boxes clipped to each picture's content, NMS per
        picture, the `max_cars` best of each. With `at_least`, only the candidates scoring that much and
        each picture's best: the same ones as without (only a better box suppresses one), in less time."""
        logits, regression, centreness = (o.float() for o in outputs)
        scores = torch.sqrt(torch.sigmoid(logits[..., 0]) * torch.sigmoid(centreness[..., 0]))  # [N, A]
        wanted = scores >= at_least
        wanted[torch.arange(len(scores)), scores.argmax(1)] = True
        images, places = torch.nonzero(wanted & (scores > self.score_floor), as_tuple=True)
        boxes = self.model.box_coder.decode(regression[images, places], self.all_anchors[places])
        limits = torch.tensor([[w, h, w, h] for h, w in contents], dtype=boxes.dtype)[images]
        boxes = torch.minimum(boxes.clamp_min(0), limits)
        keep = batched_nms(boxes, scores[images, places], images, NMS_IOU)  # best score first
        owner = images[keep]
        return [
            Found(boxes[kept][: self.max_cars], scores[images, places][kept][: self.max_cars])
            for kept in (keep[owner == i] for i in range(len(contents)))
        ]
