"""The inference chain, once: image -> [find the car, cut it out] -> eval preset -> runner -> top-k.

A model with a box head (ModelConfig.locate_size) localises, then classifies: the whole image,
squashed small, gives the car's box; the car is cut from the full-resolution image (where a phone
photo's detail is) at that box, widened by `crop_margin`, and classified. A model without one
classifies the whole image.

The TorchServe handler, the in-process benchmark, the parity check, int8 calibration's check
and training's evaluation all run a model through a `Predictor`, so a change here (a new stage,
another preset) reaches every one of them.

    predictor = Predictor.for_export(ExportDir("models/efficientnet_lite0_cars"))
    predictor.predict([Image.open("car.jpg").convert("RGB")], k=5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from carmodel.config import ModelConfig
from carmodel.export import ExportDir
from carmodel.images import uploaded_size
from carmodel.presets import cut_out, decode_side, eval_preset, locate_preset, widen
from carmodel.runners import Runner, make_runner

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in the image's pixels (x2, y2 exclusive)


@dataclass(frozen=True)
class Prediction:
    class_id: int
    class_name: str
    probability: float

    def to_dict(self) -> dict:
        return {"class_id": self.class_id, "class_name": self.class_name, "probability": round(self.probability, 6)}


@dataclass(frozen=True)
class Prepared:
    """One image, ready for the chain's first pass: `tensor` is what that pass runs on (the whole
    image at locate size, or at eval size without a box head); `image` is kept to cut the car from."""

    image: Image.Image
    tensor: torch.Tensor


@dataclass
class Forward:
    logits: torch.Tensor  # one row per image
    inputs: list[torch.Tensor]  # what was classified: the cars cut out, or the whole images
    boxes: list[Box] | None  # where the car was found, in each upload's pixels; None without a box head


class Predictor:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        classes: list[str],
        runner: Runner,
        locator: Runner | None = None,
    ):
        if config.localizes and locator is None:
            raise ValueError("a model with a box head needs a locator: a runner at its locate_size")
        self.model = model  # the eager reference: explanations need its gradients
        self.config = config
        self.classes = classes
        self.runner = runner
        self.locator = locator if config.localizes else None
        self.preprocess = eval_preset(config)
        self.locate_preprocess = locate_preset(config) if config.localizes else None
        self.margins = (config.crop_margin,) * 4  # left, top, right, bottom
        self.decode_side = decode_side(config)  # what images are decoded to (carmodel.images)

    @classmethod
    def for_export(
        cls,
        export: ExportDir,
        backend: str = "auto",
        precision: str = "auto",
        threads: int = 0,
        device="cpu",
        model: torch.nn.Module | None = None,
    ) -> Predictor:
        """The export's model (or `model`, already loaded from it) behind the fastest runner the
        settings allow: the export's int8 model when it has one and precision allows."""
        model = (model if model is not None else export.load_model(device)).to(memory_format=torch.channels_last)
        config = export.model_config
        runner = make_runner(model, config.eval_size, backend, precision, export.int8_xml, threads)
        locator = None
        if config.localizes:
            locator = make_runner(model, config.locate_size, backend, precision, export.int8_xml, threads)
        return cls(model, config, export.classes(), runner, locator)

    @property
    def engine(self) -> str:
        return f"{self.runner.backend} {self.runner.precision}"

    @property
    def localizes(self) -> bool:
        return self.locator is not None

    def classifier(self, inputs: torch.Tensor) -> torch.Tensor:
        """The eager model's logits alone (its box dropped): what explanations take gradients of."""
        outputs = self.model(inputs)
        return outputs[0] if isinstance(outputs, tuple) else outputs

    def logits(self, tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Images at eval size, preprocessed (a list, or a stacked batch) -> float logits, one row per image."""
        batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
        return self.runner.run(batch)[0]

    # ------------------------------------------------------------------ the chain

    def prepare(self, image: Image.Image) -> Prepared:
        """Per image, safe to run in threads side by side: the first pass's input."""
        return Prepared(image, (self.locate_preprocess or self.preprocess)(image))

    def locate(self, prepared: Sequence[Prepared]) -> list[Box]:
        """The car's box in each image, in the decoded image's pixels."""
        _, found = self.locator.run(torch.stack([p.tensor for p in prepared]))
        return [to_pixels(row, p.image.size) for row, p in zip(found, prepared, strict=True)]

    def region(self, size: tuple[int, int], box: Box) -> Box:
        """The part of a `size` (width, height) image classified for a car found at `box`: the box
        widened by the model's margin, inside the image."""
        return widen(box, self.margins, *size)

    def cut_car(self, image: Image.Image, box: Box) -> torch.Tensor:
        """The car at `box`, widened by the model's margin, cut from the full image and preprocessed."""
        return self.preprocess(cut_out(image, box, self.margins))

    def run(self, prepared: Sequence[Prepared], map: Callable = map) -> Forward:
        """The chain after `prepare`, for a batch. `map`: how to cut out the cars (a thread pool's map
        runs them side by side)."""
        if not self.localizes:
            inputs = [p.tensor for p in prepared]
            return Forward(self.logits(inputs), inputs, None)
        boxes = self.locate(prepared)
        images = [p.image for p in prepared]
        inputs = list(map(self.cut_car, images, boxes))
        return Forward(self.logits(inputs), inputs, list(map(in_uploaded_pixels, boxes, images)))

    def top_k(self, logits: torch.Tensor, k: int | Sequence[int]) -> list[list[Prediction]]:
        """Best first; `k` for every row, or one k per row."""
        ks = [k] * len(logits) if isinstance(k, int) else list(k)
        probabilities = F.softmax(logits.float(), dim=1)
        answers = []
        for row, row_k in zip(probabilities, ks, strict=True):
            probs, ids = torch.topk(row, min(row_k, len(self.classes)))
            answers.append(
                [Prediction(int(i), self.classes[int(i)], float(p)) for p, i in zip(probs, ids, strict=True)]
            )
        return answers

    def forward(self, images: Sequence[Image.Image]) -> Forward:
        """The whole chain for a batch of images, in this thread."""
        return self.run([self.prepare(image) for image in images])

    def predict(self, images: Sequence[Image.Image], k: int = 5) -> list[list[Prediction]]:
        return self.top_k(self.forward(images).logits, k)


def in_uploaded_pixels(box: Box, image: Image.Image) -> Box:
    """`box` in `image`'s pixels -> in the pixels of the upload it was decoded from (perhaps shrunk)."""
    (width, height), (up_width, up_height) = image.size, uploaded_size(image)
    if (width, height) == (up_width, up_height):
        return box
    sx, sy = up_width / width, up_height / height
    x1, y1, x2, y2 = box
    return round(x1 * sx), round(y1 * sy), min(round(x2 * sx), up_width), min(round(y2 * sy), up_height)


def to_pixels(box: torch.Tensor, size: tuple[int, int]) -> Box:
    """The box head's (x1, y1, x2, y2) fractions -> whole pixels of a `size` (width, height) image,
    ordered and inside it."""
    width, height = size
    x1, y1, x2, y2 = box.float().clamp(0, 1).tolist()
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height)
