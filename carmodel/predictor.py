"""The inference chain, once: image -> [find the car, cut it out] -> eval preset -> runner -> answer.

A model with a car detector (ModelConfig.detect_size, carmodel.detection) finds every car: the whole
image, letterboxed into the detector's canvas, gives each candidate's box and score; each candidate
scoring at least the calibrated detect threshold (up to `max_cars`) is cut from the full-resolution
image (where a phone photo's detail is) at its box, widened by `crop_margin`, and all the candidates of
a batch are classified in one pass. With a car head (the car check) that pass also says whether each
cut is a car, and a candidate's car score is the geometric mean of the two (`car_score`); without one,
the detector's score. The cars are the candidates whose car score reaches the car threshold; the most
prominent (area x score) is the answer's own, the others follow in `Answer.cars`. An image without one
is "no car" (its best candidate, or the whole image, is still classified: evaluation and calibration
read every image's logits).
An older model with only a box head finds one car in the whole image squashed small (with a car head,
whether there is a car at all). A model without either classifies the whole image.

The answer (`Answer`) is calibrated (carmodel/calibration.py): probabilities a person can read as
odds, the make and body type with their probabilities summed over their classes
(carmodel/vehicles.py), "no car" and "not sure" at the export's thresholds.

The TorchServe handler, the in-process benchmark, the parity check, int8 calibration's check
and training's evaluation all run a model through a `Predictor`, so a change here (a new stage,
another preset) reaches every one of them.

    predictor = Predictor.for_export(ExportDir("models/efficientnet_lite0_cars"))
    answer = predictor.predict([Image.open("car.jpg").convert("RGB")], k=5)[0]
    answer.make, answer.uncertain, answer.predictions[0].class_name
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from carmodel.calibration import Calibration, image_quality
from carmodel.config import ModelConfig
from carmodel.detection import Decoder, Letterbox
from carmodel.export import ExportDir
from carmodel.images import uploaded_size
from carmodel.models import DetectPass
from carmodel.presets import cut_out, decode_side, eval_preset, locate_preset, widen
from carmodel.runners import Runner, make_runner
from carmodel.vehicles import Vehicle, describe, groups

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in the image's pixels (x2, y2 exclusive)
MAX_CARS = 10  # cars answered per image, most prominent first (the handler's max_cars)


@dataclass(frozen=True)
class Prediction:
    class_id: int
    class_name: str
    probability: float
    vehicle: Vehicle

    def to_dict(self) -> dict:
        return {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "probability": round(self.probability, 6),
            **self.vehicle.to_dict(),
        }


@dataclass(frozen=True)
class Share:
    """A make or body type and its probability, summed over its classes."""

    name: str
    probability: float

    def to_dict(self) -> dict:
        return {"name": self.name, "probability": round(self.probability, 6)}


@dataclass(frozen=True)
class Car:
    """One car found in an image, and what it is."""

    box: Box  # in the upload's pixels
    score: float  # the car score: the detector's, with the car check's (car_score)
    make: Share | None  # None when even the make is not sure
    body_type: Share
    uncertain: bool
    predictions: list[Prediction]

    def to_dict(self) -> dict:
        return {
            "box": list(self.box),
            "score": round(self.score, 6),
            "make": self.make and self.make.to_dict(),
            "body_type": self.body_type.to_dict(),
            "uncertain": self.uncertain,
            "predictions": [p.to_dict() for p in self.predictions],
        }


@dataclass(frozen=True)
class Answer:
    """What the model says of one image: its fields describe the most prominent car; `cars` lists every
    car a detector found, that one first ([] without a car)."""

    car_found: bool
    car_score: float | None  # the car/no-car score; None for a model without a car head
    box: Box | None  # where the car is, in the upload's pixels; None without a box head or a car
    make: Share | None  # None without a car, or when even the make is not sure
    body_type: Share | None  # None without a car
    uncertain: bool  # a car, but the top-1 probability is below the sure threshold
    predictions: list[Prediction]  # best first; [] without a car
    cars: list[Car] | None = None  # every car found, this one first; None: the model has no detector

    def rows(self) -> list[dict]:
        """The plain answer: the top-k rows ([] for a photo without a car)."""
        return [p.to_dict() for p in self.predictions]

    def details(self) -> dict:
        """The detailed answer (X-Details), every field present."""
        return {
            "car": {
                "found": self.car_found,
                "score": None if self.car_score is None else round(self.car_score, 6),
                "box": None if self.box is None else list(self.box),
            },
            "make": self.make and self.make.to_dict(),
            "body_type": self.body_type and self.body_type.to_dict(),
            "uncertain": self.uncertain,
            "predictions": self.rows(),
        } | ({} if self.cars is None else {"cars": [car.to_dict() for car in self.cars]})


@dataclass(frozen=True)
class Prepared:
    """One image, ready for the chain's first pass: `tensor` is what that pass runs on (the whole
    image on the detector's canvas, or at locate size, or at eval size without a box head); `image`
    is kept to cut the cars from; `scale`: canvas pixels per image pixel (a detector's)."""

    image: Image.Image
    tensor: torch.Tensor
    scale: float = 1.0


@dataclass(frozen=True)
class Explanation:
    """Where the model looked for one class: `heatmap` (0-1) over what was classified, and `region`,
    where that lies in the upload (None: the whole image)."""

    prediction: Prediction
    heatmap: torch.Tensor
    region: Box | None

    def to_dict(self) -> dict:
        answer = {
            "class_id": self.prediction.class_id,
            "class_name": self.prediction.class_name,
            "probability": round(self.prediction.probability, 6),
            "heatmap": [[round(v, 4) for v in line] for line in self.heatmap.tolist()],
        }
        return answer | ({"region": list(self.region)} if self.region else {})


@dataclass
class Others:
    """The cars of a batch besides each image's own (a detector's), classified in the same pass."""

    logits: torch.Tensor
    sides: torch.Tensor
    quality: torch.Tensor | None
    boxes: list[Box]  # in the uploads' pixels
    scores: list[float]  # car scores: below the car threshold, a candidate the car check turned down
    owners: list[int]  # the image each belongs to


@dataclass
class Forward:
    logits: torch.Tensor  # one row per image: its most prominent car (or its best guess, or the whole image)
    inputs: list[torch.Tensor]  # what was classified: the cars cut out, or the whole images
    boxes: list[Box] | None  # where the car was found, in each upload's pixels; None without a box head
    sides: torch.Tensor  # the classified region's size, sqrt(width x height) in decoded pixels: what T depends on
    car_scores: torch.Tensor | None = None  # the car/no-car score of each image; None without a car head
    uploaded_sizes: list[tuple[int, int]] | None = None  # each upload's (width, height), before decoding shrank it
    quality: torch.Tensor | None = None  # calibration.image_quality of what was classified: T depends on it too
    others: Others | None = None  # a detector's other cars found
    detect_scores: torch.Tensor | None = None  # a detector's own score of each row's car (car_scores: checked)


class Predictor:
    def __init__(
        self,
        model: torch.nn.Module,
        config: ModelConfig,
        classes: list[str],
        runner: Runner,
        locator: Runner | None = None,
        calibration: Calibration | None = None,
    ):
        if config.localizes and locator is None:
            raise ValueError("a model with a box head needs a locator: a runner at its locate_size")
        self.model = model  # the eager reference: explanations need its gradients
        self.config = config
        self.classes = classes
        self.vehicles = [describe(name) for name in classes]
        self.makes, make_of = groups(classes, "make")
        self.body_types, body_of = groups(classes, "body_type")
        self.make_of, self.body_of = torch.tensor(make_of), torch.tensor(body_of)
        self.calibration = calibration or Calibration()
        self.runner = runner
        self.locator = locator if config.localizes else None
        self.preprocess = eval_preset(config)
        self.locate_preprocess = locate_preset(config) if config.localizes else None
        self.max_cars = MAX_CARS
        self.flip = False  # test-time augmentation: classify each car mirrored too (the handler's `flip`)
        self.canvas = Letterbox(config) if config.detects else None
        self.decoder = Decoder(model.detector, config) if config.detects else None
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
        if config.detects:  # the detector's pass is a network of its own, with an int8 model of its own
            detect_int8 = export.detector_int8_xml if export.has_detector_int8 else None
            detect_precision = "auto" if precision == "int8" and detect_int8 is None else precision
            locator = make_runner(
                DetectPass(model), config.detect_size, backend, detect_precision, detect_int8, threads
            )
        elif config.localizes:
            locator = make_runner(model, config.locate_size, backend, precision, export.int8_xml, threads)
        return cls(model, config, export.classes(), runner, locator, export.calibration())

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
        return self.classify(tensors)[0]

    def classify(self, tensors: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`logits`, and with a car head on this pass (a detector's car check) its car logits. With `flip`,
        each image and its mirror image in one batch, their logits averaged: one answer for both."""
        batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
        outputs = self.runner.run(torch.cat([batch, batch.flip(-1)]) if self.flip else batch)
        logits, car_logits = outputs[0], outputs[2].float() if self.checks_cars else None
        if self.flip:
            logits = mirrored_mean(logits)
            car_logits = None if car_logits is None else mirrored_mean(car_logits)
        return logits, car_logits

    @property
    def checks_cars(self) -> bool:
        """Whether each candidate the detector finds is looked at again by the car head, in the classifier's pass."""
        return self.decoder is not None and self.config.car_head

    # ------------------------------------------------------------------ the chain

    def prepare(self, image: Image.Image) -> Prepared:
        """Per image, safe to run in threads side by side: the first pass's input."""
        if self.canvas is not None:
            return Prepared(image, *self.canvas(image))
        return Prepared(image, (self.locate_preprocess or self.preprocess)(image))

    def find(self, prepared: Sequence[Prepared], at_least: float = 0.0) -> list[tuple[list[Box], list[float]]]:
        """Every candidate car of each image (the detector's, score >= its floor, best first; with
        `at_least`, only those scoring that much and the best): boxes in the decoded image's pixels, and scores."""
        outputs = self.locator.run(torch.stack([p.tensor for p in prepared]))
        found = self.decoder.cars(outputs, [self.canvas.content(p.image.size) for p in prepared], at_least)
        return [
            (pixel_boxes(f.boxes / p.scale, p.image.size, fractions=False), f.scores.tolist())
            for f, p in zip(found, prepared, strict=True)
        ]

    def cars_of(self, image: Image.Image, boxes: list[Box], scores: list[float]) -> list[tuple[Box, float]]:
        """The candidates classified for one image: those the detector scores at least the detect threshold,
        most prominent (area x score) first, at most max_cars; none: the best candidate, or the whole
        image (a row to classify; the answer says no car)."""
        threshold = self.calibration.candidate_threshold
        cars = [(b, s) for b, s in zip(boxes, scores, strict=True) if s >= threshold]
        cars = sorted(cars, key=lambda c: -(c[0][2] - c[0][0]) * (c[0][3] - c[0][1]) * c[1])[: self.max_cars]
        if cars:
            return cars
        return [(boxes[0], scores[0])] if boxes else [((0, 0, *image.size), 0.0)]

    def locate(self, prepared: Sequence[Prepared]) -> tuple[list[Box], torch.Tensor | None]:
        """The car's box in each image, in the decoded image's pixels, and (with a car head) the
        score that there is a car at all."""
        _, found, *car = self.locator.run(torch.stack([p.tensor for p in prepared]))
        boxes = [to_pixels(row, p.image.size) for row, p in zip(found, prepared, strict=True)]
        return boxes, torch.sigmoid(car[0].float()) if car else None

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
        images = [p.image for p in prepared]
        if not self.localizes:
            inputs = [p.tensor for p in prepared]
            sides, batch = side_lengths([(0, 0, *i.size) for i in images]), torch.stack(inputs)
            return Forward(self.logits(batch), inputs, None, sides, quality=self.quality(batch))
        if self.decoder is not None:
            return self.run_detected(prepared, map)
        boxes, car_scores = self.locate(prepared)
        inputs = list(map(self.cut_car, images, boxes))
        regions = [self.region(image.size, box) for image, box in zip(images, boxes, strict=True)]
        uploaded = list(map(in_uploaded_pixels, boxes, images))
        sizes = [uploaded_size(image) for image in images]
        batch = torch.stack(inputs)  # once, for the classifier and the quality alike
        return Forward(
            self.logits(batch), inputs, uploaded, side_lengths(regions), car_scores, sizes, self.quality(batch)
        )

    def run_detected(self, prepared: Sequence[Prepared], map: Callable) -> Forward:
        """`run` with a detector: every image's candidates cut out and classified in one batch; each image's
        most prominent car (a candidate whose car score reaches the threshold, else its best candidate)
        gives the Forward's own row, the rest are `Forward.others`."""
        images = [p.image for p in prepared]
        candidates = self.find(prepared, self.calibration.candidate_threshold)
        found = [self.cars_of(p.image, *f) for p, f in zip(prepared, candidates, strict=True)]
        owners, boxes, detected = zip(*[(i, *c) for i, cars in enumerate(found) for c in cars], strict=True)
        inputs = list(map(self.cut_car, [images[i] for i in owners], boxes))
        regions = [self.region(images[i].size, box) for i, box in zip(owners, boxes, strict=True)]
        uploaded = list(map(in_uploaded_pixels, boxes, [images[i] for i in owners]))
        batch = torch.stack(inputs)
        logits, car_logits = self.classify(batch)
        detected = torch.tensor(detected)
        scores = detected if car_logits is None else car_score(detected, car_logits)
        order = prominence(owners, uploaded, scores.tolist(), self.calibration.car_threshold)
        own = [rows[0] for rows in order]
        rest = [r for rows in order for r in rows[1:]]
        quality, sides = self.quality(batch), side_lengths(regions)
        others = Others(
            logits[rest],
            sides[rest],
            None if quality is None else quality[rest],
            [uploaded[r] for r in rest],
            scores[rest].tolist(),
            [owners[r] for r in rest],
        )
        return Forward(
            logits[own],
            [inputs[r] for r in own],
            [uploaded[r] for r in own],
            sides[own],
            scores[own],
            [uploaded_size(image) for image in images],
            None if quality is None else quality[own],
            others,
            detect_scores=detected[own],
        )

    def quality(self, batch: torch.Tensor) -> torch.Tensor | None:
        """What the calibration reads off the classified images besides their size (when it does)."""
        if not self.calibration.sees_quality:
            return None
        return image_quality(batch, self.config.mean, self.config.std)

    def probabilities(self, forward: Forward) -> torch.Tensor:
        """Calibrated class probabilities, one row per image."""
        return self.calibration.probabilities(forward.logits, forward.sides, forward.quality)

    def top_k(self, probabilities: torch.Tensor, k: int | Sequence[int]) -> list[list[Prediction]]:
        """Best first; `k` for every row, or one k per row."""
        ks = [k] * len(probabilities) if isinstance(k, int) else list(k)
        answers = []
        for row, row_k in zip(probabilities, ks, strict=True):
            probs, ids = torch.topk(row, min(row_k, len(self.classes)))
            answers.append([self.prediction(int(i), float(p)) for p, i in zip(probs, ids, strict=True)])
        return answers

    def prediction(self, class_id: int, probability: float) -> Prediction:
        return Prediction(class_id, self.classes[class_id], probability, self.vehicles[class_id])

    @staticmethod
    def summed(probabilities: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        """Class probabilities summed per make (`of` = make_of) or body type (body_of): [images, groups]."""
        return torch.zeros(len(probabilities), int(of.max()) + 1).index_add_(1, of, probabilities.float())

    def shares(self, probabilities: torch.Tensor, of: torch.Tensor, names: list[str]) -> list[Share]:
        """The most probable make or body type of each row, its probability summed over its classes."""
        best, ids = self.summed(probabilities, of).max(1)
        return [Share(names[int(i)], float(p)) for p, i in zip(best, ids, strict=True)]

    def describe(
        self, probabilities: torch.Tensor, k: int | Sequence[int]
    ) -> list[tuple[list[Prediction], Share | None, Share, bool]]:
        """Each row's top-k, make (None when not even it is sure), body type and whether it is unsure."""
        c = self.calibration
        rows = self.top_k(probabilities, k)
        makes = self.shares(probabilities, self.make_of, self.makes)
        bodies = self.shares(probabilities, self.body_of, self.body_types)
        described = []
        for top, make, body in zip(rows, makes, bodies, strict=True):
            uncertain = top[0].probability < c.sure_threshold
            named = make if not uncertain or make.probability >= c.make_threshold else None
            described.append((top, named, body, uncertain))
        return described

    def answer(self, forward: Forward, k: int | Sequence[int]) -> list[Answer]:
        """The answer for each image of `forward`: `k` predictions (one k, or one per image)."""
        ks = [k] * len(forward.logits) if isinstance(k, int) else list(k)
        described = self.describe(self.probabilities(forward), ks)
        scores = forward.car_scores.tolist() if forward.car_scores is not None else [None] * len(ks)
        boxes = forward.boxes or [None] * len(ks)
        others: list[list[Car]] = [[] for _ in ks]
        if forward.others is not None and forward.others.owners:
            o = forward.others
            probabilities = self.calibration.probabilities(o.logits, o.sides, o.quality)
            for owner, box, score, car in zip(
                o.owners, o.boxes, o.scores, self.describe(probabilities, [ks[i] for i in o.owners]), strict=True
            ):
                if score >= self.calibration.car_threshold:  # not a candidate the car check turned down
                    others[owner].append(Car(box, score, car[1], car[2], car[3], car[0]))
        answers, detects = [], self.decoder is not None
        for (top, make, body, uncertain), score, box, rest in zip(described, scores, boxes, others, strict=True):
            if score is not None and score < self.calibration.car_threshold:
                answers.append(Answer(False, score, None, None, None, False, [], [] if detects else None))
                continue
            cars = [Car(box, score, make, body, uncertain, top), *rest] if detects else None
            answers.append(Answer(True, score, box, make, body, uncertain, top, cars))
        return answers

    def explain(self, forward: Forward, targets: Sequence[int | None], steps: int) -> list[Explanation]:
        """Integrated Gradients of each image of `forward` towards its class in `targets` (None or out of
        range: its top-1), summed over colour channels into a 0-1 heat map of what was classified:
        with a box head the car cut out, whose place in the upload is `region`."""
        from captum.attr import IntegratedGradients  # explanations only: the answer path does without

        integrated_gradients = IntegratedGradients(self.classifier)
        device = next(self.model.parameters()).device
        probabilities = self.probabilities(forward)
        explanations = []
        for row, target in enumerate(targets):
            if target is None or not 0 <= target < len(self.classes):
                target = int(forward.logits[row].argmax())
            inputs = forward.inputs[row].unsqueeze(0).to(device).requires_grad_()
            heatmap = integrated_gradients.attribute(inputs, target=target, n_steps=steps).squeeze(0).abs().sum(0)
            region = self.region(forward.uploaded_sizes[row], forward.boxes[row]) if forward.boxes else None
            prediction = self.prediction(target, float(probabilities[row, target]))
            explanations.append(Explanation(prediction, heatmap / heatmap.max().clamp_min(1e-12), region))
        return explanations

    def forward(self, images: Sequence[Image.Image]) -> Forward:
        """The whole chain for a batch of images, in this thread."""
        return self.run([self.prepare(image) for image in images])

    def predict(self, images: Sequence[Image.Image], k: int = 5) -> list[Answer]:
        return self.answer(self.forward(images), k)


def prominence(
    owners: Sequence[int], boxes: Sequence[Box], scores: Sequence[float], threshold: float
) -> list[list[int]]:
    """The rows of each image (`owners`: the image of each row), the cars (a score of at least
    `threshold`) first, most prominent (area x score) first; then the candidates turned down."""
    rows: list[list[int]] = [[] for _ in range(max(owners) + 1)]
    for row, owner in enumerate(owners):
        rows[owner].append(row)

    def key(row: int) -> tuple[bool, float]:
        x1, y1, x2, y2 = boxes[row]
        return scores[row] < threshold, -(x2 - x1) * (y2 - y1) * scores[row]

    return [sorted(r, key=key) for r in rows]


def car_score(detected: torch.Tensor, car_logits: torch.Tensor) -> torch.Tensor:
    """A candidate's car score: the geometric mean of the detector's score and the car check's
    probability, so that either can turn it down."""
    return (detected.float() * torch.sigmoid(car_logits.float())).sqrt()


def mirrored_mean(outputs: torch.Tensor) -> torch.Tensor:
    """A batch of images followed by their mirror images -> each image's outputs averaged with its mirror's."""
    images, mirrored = outputs.float().chunk(2)
    return (images + mirrored) / 2


def side_lengths(regions: Sequence[Box]) -> torch.Tensor:
    """sqrt(width x height) of each region: one number for how many pixels a car had."""
    return torch.tensor([float(((x2 - x1) * (y2 - y1)) ** 0.5) for x1, y1, x2, y2 in regions])


def in_uploaded_pixels(box: Box, image: Image.Image) -> Box:
    """`box` in `image`'s pixels -> in the pixels of the upload it was decoded from (perhaps shrunk)."""
    (width, height), (up_width, up_height) = image.size, uploaded_size(image)
    if (width, height) == (up_width, up_height):
        return box
    sx, sy = up_width / width, up_height / height
    x1, y1, x2, y2 = box
    return round(x1 * sx), round(y1 * sy), min(round(x2 * sx), up_width), min(round(y2 * sy), up_height)


def to_pixels(box: torch.Tensor, size: tuple[int, int], fractions: bool = True) -> Box:
    """A box's (x1, y1, x2, y2) - the box head's fractions, or pixels - as whole pixels of a `size`
    (width, height) image, ordered and inside it."""
    return pixel_boxes(box[None], size, fractions)[0]


def pixel_boxes(boxes: torch.Tensor, size: tuple[int, int], fractions: bool = True) -> list[Box]:
    """`to_pixels` for every row of a [K, 4] tensor at once."""
    width, height = size
    limits = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.minimum((boxes.float() * (limits if fractions else 1)).clamp_min(0), limits)
    xs, ys = boxes[:, 0::2].sort(1).values, boxes[:, 1::2].sort(1).values
    return [tuple(row) for row in torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), 1).round().int().tolist()]
