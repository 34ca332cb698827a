"""The served chain, once: a batch of uploads -> the decoding budget -> decoded side by side ->
carmodel's Predictor (locate, cut, classify) -> an answer or a refusal per upload.

The TorchServe handler (handler/car_handler.py), the in-process benchmark (bench/inprocess.py) and
predict-dir's Ray engine (client/ray_engine.py) all answer through a `ServedChain` built from the same
`HandlerSettings`, so the limits, the budget and the thresholds a photo meets are the same wherever it
is answered. What each caller adds is its own: the handler reads TorchServe's rows, headers, metrics
and statuses; the others read bytes.

    chain = ServedChain.for_export(ExportDir("models/efficientnet_lite0_cars"))
    answers = chain([chain.open(Path("car.jpg").read_bytes())])  # Answer or InputError per upload
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from PIL import Image

from carmodel.errors import StatusError
from carmodel.export import ExportDir
from carmodel.images import InputError, decode_cost, decode_upload, open_upload
from carmodel.predictor import Answer, Forward, Predictor, Prepared
from handler.inputs import Options
from handler.settings import HandlerSettings

T = TypeVar("T")


class ModelLoadError(StatusError):
    """The chain could not be built (the model did not load): every request is answered 503 with the reason."""


class BusyError(InputError):
    """An upload past its batch's decoding budget: answered 503, to be sent again in a second."""

    retry_after_s = 1

    def __init__(self):
        super().__init__(503, "busy decoding large images: retry in a second")


@dataclass
class Upload:
    """One image as received: opened (its header read, checked against the limits), not yet decoded."""

    image: Image.Image
    options: Options


@dataclass
class Batch:
    """A batch's uploads as they travel through the chain's steps."""

    size: int
    prepared: list[Prepared] = field(default_factory=list)  # the good images
    positions: list[int] = field(default_factory=list)  # batch index of each good image
    options: dict[int, Options] = field(default_factory=dict)  # batch index -> its k and answer shape
    errors: dict[int, InputError] = field(default_factory=dict)  # batch index -> why it was refused
    forward: Forward | None = None  # the Predictor's outputs for the good images, in order

    def add(self, idx: int, prepared: Prepared, options: Options) -> None:
        self.positions.append(idx)
        self.prepared.append(prepared)
        self.options[idx] = options


class ServedChain:
    """One export served with one HandlerSettings: its Predictor (thresholds from the settings), its limits,
    its decoding budget and its thread pool. The steps, in order: `opened`, `prepare`, `forward`, `answers`."""

    def __init__(self, predictor: Predictor, settings: HandlerSettings | None = None):
        self.settings = settings = settings or HandlerSettings()
        predictor.calibration = predictor.calibration.with_thresholds(
            car_threshold=settings.car_threshold, sure_threshold=settings.sure_threshold
        )
        predictor.max_cars = settings.max_cars
        predictor.flip = settings.flip
        self.predictor = predictor
        self.max_topk = settings.largest_topk(len(predictor.classes))
        # PIL and the transforms release the GIL: a batch's images decode and are cut out side by side.
        self.pool = ThreadPoolExecutor(settings.threads or os.cpu_count() or 1, thread_name_prefix="decode")

    @classmethod
    def for_export(
        cls,
        export: ExportDir,
        settings: HandlerSettings | None = None,
        model: torch.nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> ServedChain:
        """The export's model (or `model`, already loaded from it) behind the runner the settings ask
        for, compiled and warmed up here: first-request latency belongs to model load, not to a user."""
        s = settings or HandlerSettings()
        backend = s.backend if torch.device(device).type == "cpu" else "torch"  # OpenVINO: CPU only
        return cls(Predictor.for_export(export, backend, s.precision, s.threads, device, model=model), s)

    # ------------------------------------------------------------------ the steps

    def open(self, data: bytes, options: Options | None = None) -> Upload:
        """Bytes -> an Upload within the image limits (InputError otherwise), its top-k defaulted."""
        options = options or Options()
        options = dataclasses.replace(options, topk=options.topk or self.settings.topk)
        return Upload(open_upload(data, self.settings.image_limits), options)

    def opened(self, open_one: Callable[[T], Upload | InputError], items: Iterable[T]) -> list[Upload | InputError]:
        """`open_one` over `items`, in the chain's own threads: an image is opened in the pool that decodes
        it. Opened in the caller's thread and decoded in the pool's, the worker's memory grew by ~55 MB per
        1,000 requests (native memory: glibc's per-thread arenas), measured under the load test."""
        return list(self.pool.map(open_one, items))

    def within_budget(self, uploads: Sequence[Upload | InputError]) -> list[Upload | InputError]:
        """Past `batch_decode_pixels` an upload waits for a later batch (BusyError); one always passes."""
        spent, budget, kept = 0, self.settings.batch_decode_pixels, []
        if not budget:  # an offline job (predict-dir's Ray engine) has no one else to wait for
            return list(uploads)
        for upload in uploads:
            if isinstance(upload, Upload):
                cost = decode_cost(upload.image, self.predictor.decode_side)
                if spent and spent + cost > budget:
                    upload = BusyError()
                else:
                    spent += cost
            kept.append(upload)
        return kept

    def _decode(self, upload: Upload | InputError) -> Prepared | InputError:
        if isinstance(upload, InputError):
            return upload
        try:
            return self.predictor.prepare(decode_upload(upload.image, self.predictor.decode_side))
        except InputError as err:
            return err

    def prepare(self, uploads: Sequence[Upload | InputError]) -> Batch:
        """Within the budget, decoded side by side: the batch's first-pass inputs, and its refusals."""
        uploads = self.within_budget(uploads)
        batch = Batch(len(uploads))
        for idx, (upload, prepared) in enumerate(zip(uploads, self.pool.map(self._decode, uploads), strict=True)):
            if isinstance(prepared, InputError):
                batch.errors[idx] = prepared
            else:
                batch.add(idx, prepared, upload.options)
        return batch

    def forward(self, batch: Batch) -> Batch:
        if batch.prepared:
            batch.forward = self.predictor.run(batch.prepared, map=self.pool.map)
        return batch

    def answers(self, batch: Batch) -> list[Answer | InputError]:
        """One per upload, in order: its Answer, or the InputError that refused it."""
        results: list[Answer | InputError] = [batch.errors.get(idx) for idx in range(batch.size)]
        if batch.forward is not None:
            ks = [batch.options[idx].topk for idx in batch.positions]
            for idx, answer in zip(batch.positions, self.predictor.answer(batch.forward, ks), strict=True):
                results[idx] = answer
        return results

    def __call__(self, uploads: Sequence[Upload | InputError]) -> list[Answer | InputError]:
        """The whole chain for a batch of uploads (as `opened` gives them)."""
        return self.answers(self.forward(self.prepare(uploads)))

    def answer_bytes(self, bodies: Sequence[bytes], options: Options | None = None) -> list[Answer | InputError]:
        """The chain for a batch of encoded images, each opened with the same options."""
        return self(self.opened(lambda body: self.refusing(self.open, body, options), bodies))

    @staticmethod
    def refusing(open_one: Callable[..., Upload], *args) -> Upload | InputError:
        """`open_one(*args)`, or the InputError that refused it: one bad image must not stop its batch."""
        try:
            return open_one(*args)
        except InputError as err:
            return err
