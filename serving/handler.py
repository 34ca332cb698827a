"""TorchServe handler for the Stanford Cars classifier: TorchServe's side of carmodel's `Predictor`.

Subclasses `BaseHandler` and overrides its four steps. The chain itself (decode, locate, cut,
classify, calibrated answer, explanations) is the Predictor's; reading a request is
serving/requests.py's; gRPC's quirks are serving/grpc.py's; the metrics serving/metrics.py's.
What is left here:

* loading from the unpacked archive (carmodel.export.ExportDir); a model that cannot load
  answers 503 with the reason instead of restarting forever;
* a batch's images decoded side by side in threads, within a budget of pixels per batch (a flood
  of huge PNGs waits its turn with 503 + Retry-After instead of starving every other photo); each
  bad item gets its own 4xx JSON error while its neighbours get their answers; every answer is
  `application/json`;
* a description (`GET /models/<name>?customized=true`) with the engine and settings in use.

Settings: the `handler:` section of the archive's model-config.yaml (serving/settings.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from carmodel.export import ExportDir
from carmodel.images import InputError, decode_cost, decode_upload
from carmodel.predictor import Predictor
from serving import grpc, metrics, oip, requests
from serving.batch import Batch
from serving.settings import HandlerSettings

logger = logging.getLogger(__name__)
oip.install()  # before TorchServe builds the `kservev2` envelope (KServe's v2 protocol) around this handler
JSON = "application/json"


class CarClassifier(BaseHandler):
    load_error: str | None = None
    predictor: Predictor | None = None

    def initialize(self, context):
        """Load the model; if that fails, stay up and answer every request with a 503 that says why.

        TorchServe 0.12 restarts a worker whose initialize raises, forever, and requests queued for
        the model wait for it with no answer. A worker that reports the failure answers them at once,
        and serving/torchserve.py reads the reason from the model's description.
        """
        try:
            self._load(context)
        except Exception as err:  # any failure to load: a corrupt .pth, a missing module, OOM
            logger.exception("%s failed to load; answering 503 to every request", context.model_name)
            self.load_error = f"model failed to load: {type(err).__name__}: {str(err)[:300]}"
        self.context = context
        self.initialized = True

    def _load(self, context):
        self.settings = HandlerSettings.from_section((getattr(context, "model_yaml_config", None) or {}).get("handler"))
        self.export = ExportDir(Path(context.system_properties["model_dir"]))
        super().initialize(context)  # the device, then our _load_pickled_model
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels  # PIL's decompression-bomb guard, at our limit
        backend = self.settings.backend if self.device.type == "cpu" else "torch"  # OpenVINO: CPU only
        # Compiled and warmed up here: first-request latency belongs to model load, not to a user.
        predictor = Predictor.for_export(
            self.export, backend, self.settings.precision, self.settings.threads, model=self.model
        )
        predictor.calibration = predictor.calibration.with_thresholds(
            car_threshold=self.settings.car_threshold, sure_threshold=self.settings.sure_threshold
        )
        self.max_topk = self.settings.largest_topk(len(predictor.classes))
        self.decode_pool = ThreadPoolExecutor(self.settings.threads or os.cpu_count() or 1, thread_name_prefix="decode")
        self.predictor = predictor
        logger.info("%s ready: %s", context.model_name, self.describe_handle())

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        return self.export.load_model(self.device)

    def describe_handle(self) -> dict:
        """What `GET /models/<name>?customized=true` shows: the engine and settings in use, or why loading failed."""
        if self.predictor is None:
            return {"load_error": self.load_error}
        return {
            "load_error": None,
            "arch": self.predictor.config.arch,
            "classes": len(self.predictor.classes),
            "eval_size": self.predictor.config.eval_size,
            "locate_size": self.predictor.config.locate_size,
            "backend": self.predictor.runner.backend,
            "precision": self.predictor.runner.precision,
            "calibration": dataclasses.asdict(self.predictor.calibration),
            "pid": os.getpid(),
            "settings": dataclasses.asdict(self.settings),
        }

    def handle(self, data, context):
        self.context = context
        if self.load_error is not None and not self._is_describe():
            responses = [self._refuse(idx, 503, self.load_error, "ModelLoadError") for idx in range(len(data))]
        else:
            responses = super().handle(data, context)
        for idx in range(len(data)):
            if requests.has_request(context, idx):
                context.set_response_content_type(idx, JSON)  # TorchServe sends none unless told
        grpc.finish(context, responses, oip.is_error)
        return responses

    # ------------------------------------------------------------------ the four steps

    def preprocess(self, data) -> Batch:
        started = time.perf_counter()
        batch = Batch(len(data))
        # Headers first (cheap), then the pixels of those within the batch's budget. PIL and the
        # transforms release the GIL: a batch's images decode side by side.
        opened = self._within_budget(list(self.decode_pool.map(self._open, range(len(data)), data)))
        for idx, prepared in enumerate(self.decode_pool.map(self._prepare, opened)):
            if isinstance(prepared, InputError):
                batch.errors[idx] = prepared
            else:
                batch.add(idx, *prepared)
        self._stage_time("preprocess", started, len(data))
        return batch

    def _open(self, idx: int, row) -> requests.ImageRequest | InputError:
        try:
            headers = requests.request_headers(self.context, idx)
            return requests.read_row(row, headers, self.settings.image_limits, self.max_topk, self.settings.topk)
        except InputError as err:
            return err

    def _within_budget(self, opened: list) -> list:
        """Past `batch_decode_pixels`, an image waits for a later batch (503 + Retry-After: a client's retry)."""
        spent, budget = 0, self.settings.batch_decode_pixels
        for idx, request in enumerate(opened):
            if isinstance(request, InputError):
                continue
            cost = decode_cost(request.image, self.predictor.decode_side)
            if spent and spent + cost > budget:
                opened[idx] = InputError(503, "busy decoding large images: retry in a second")
                if requests.has_request(self.context, idx):
                    self.context.set_response_header(idx, "Retry-After", "1")
                continue
            spent += cost
        return opened

    def _prepare(self, request):
        if isinstance(request, InputError):
            return request
        try:
            image = decode_upload(request.image, self.predictor.decode_side)
            return self.predictor.prepare(image), request.options
        except InputError as err:
            return err

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        if batch.prepared:
            started = time.perf_counter()
            batch.forward = self.predictor.run(batch.prepared, map=self.decode_pool.map)
            self._stage_time("inference", started, len(batch.prepared))
        return batch

    def postprocess(self, batch: Batch) -> list:
        responses = self._refusals(batch)
        if batch.forward is not None:
            answers = self.predictor.answer(batch.forward, [batch.options[idx].topk for idx in batch.positions])
            for idx, answer in zip(batch.positions, answers, strict=True):
                responses[idx] = requests.shaped(answer, batch.options[idx])
                metrics.add_answer(self.context.metrics, answer)
        logger.info("batch of %d request(s), %d refused", batch.size, len(batch.errors))  # for people reading the log
        return [responses[idx] for idx in range(batch.size)]

    def explain_handle(self, data_preprocess: Batch, raw_data) -> list:
        """Integrated Gradients for each good image, towards its top-1 class (or a `target` field)."""
        batch = self.inference(data_preprocess)
        responses = self._refusals(batch)
        if batch.forward is not None:
            targets = [requests.explain_target(raw_data[idx]) for idx in batch.positions]
            explanations = self.predictor.explain(batch.forward, targets, self.settings.ig_steps)
            for idx, explanation in zip(batch.positions, explanations, strict=True):
                responses[idx] = explanation.to_dict()
        return [responses[idx] for idx in range(batch.size)]

    # ------------------------------------------------------------------ refusals and metrics

    def _refusals(self, batch: Batch) -> dict[int, dict]:
        return {idx: self._refuse(idx, err.status, err.message) for idx, err in batch.errors.items()}

    def _refuse(self, idx: int, status: int, message: str, kind: str = "InputError") -> dict:
        if requests.has_request(self.context, idx):
            self.context.set_response_status(status, message, idx)
        if kind == "InputError":
            metrics.add_refusal(self.context.metrics, status)
        return {"code": status, "type": kind, "message": message}

    def _stage_time(self, stage: str, started: float, images: int) -> None:
        if self.context is not None:
            metrics.add_stage_time(self.context.metrics, stage, time.perf_counter() - started, images)
