"""TorchServe handler for the Stanford Cars classifier: TorchServe's side of the served chain.

TorchServe takes the one class this module defines as the handler. It subclasses `BaseHandler` and
overrides its four steps; the chain itself (budget, decode, locate, cut, classify, calibrated answer)
is handler/chain.py's, reading a request handler/inputs.py's, gRPC's quirks handler/grpc_calls.py's,
the metrics handler/metrics.py's. What is left here:

* loading from the unpacked archive (carmodel.export.ExportDir); a model that cannot load
  answers 503 with the reason instead of restarting forever;
* each bad item of a batch gets its own 4xx JSON error (StatusError.to_json) while its neighbours
  get their answers; a busy one gets Retry-After; every answer is `application/json`;
* a description (`GET /models/<name>?customized=true`) with the engine and settings in use.

Settings: the `handler:` section of the archive's model-config.yaml (handler/settings.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from carmodel.errors import StatusError
from carmodel.export import ExportDir
from carmodel.images import InputError
from handler import grpc_calls, inputs, metrics, oip
from handler.chain import Batch, ModelLoadError, ServedChain
from handler.settings import HandlerSettings

logger = logging.getLogger(__name__)
oip.install()  # before TorchServe builds the `kservev2` envelope (KServe's v2 protocol) around this handler
JSON = "application/json"


class CarClassifier(BaseHandler):
    load_error: ModelLoadError | None = None
    chain: ServedChain | None = None

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
            self.load_error = ModelLoadError(503, f"model failed to load: {type(err).__name__}: {str(err)[:300]}")
        self.context = context
        self.initialized = True

    def _load(self, context):
        self.settings = HandlerSettings.from_section((getattr(context, "model_yaml_config", None) or {}).get("handler"))
        self.export = ExportDir(Path(context.system_properties["model_dir"]))
        super().initialize(context)  # the device, then our _load_pickled_model
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels  # PIL's decompression-bomb guard, at our limit
        self.chain = ServedChain.for_export(self.export, self.settings, self.model, self.device)
        logger.info("%s ready: %s", context.model_name, self.describe_handle())

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        return self.export.load_model(self.device)

    def describe_handle(self) -> dict:
        """What `GET /models/<name>?customized=true` shows: the engine and settings in use, or why loading failed."""
        if self.chain is None:
            return {"load_error": self.load_error and self.load_error.message}
        predictor = self.chain.predictor
        return {
            "load_error": None,
            "arch": predictor.config.arch,
            "classes": len(predictor.classes),
            "eval_size": predictor.config.eval_size,
            "locate_size": predictor.config.locate_size,
            "detect_size": list(predictor.config.detect_size),
            "backend": predictor.runner.backend,
            "precision": predictor.runner.precision,
            "locator_precision": predictor.locator and predictor.locator.precision,
            "calibration": dataclasses.asdict(predictor.calibration),
            "pid": os.getpid(),
            "settings": dataclasses.asdict(self.settings),
        }

    def handle(self, data, context):
        self.context = context
        if self.load_error is not None and not self._is_describe():
            responses = [self._refuse(idx, self.load_error) for idx in range(len(data))]
        else:
            responses = super().handle(data, context)
        for idx in range(len(data)):
            if inputs.has_request(context, idx):
                context.set_response_content_type(idx, JSON)  # TorchServe sends none unless told
        grpc_calls.finish(context, responses, oip.is_error)
        return responses

    # ------------------------------------------------------------------ the four steps

    def preprocess(self, data) -> Batch:
        started = time.perf_counter()
        batch = self.chain.prepare(self.chain.opened(self._open, enumerate(data)))
        self._stage_time("preprocess", started, len(data))
        return batch

    def _open(self, item: tuple[int, object]):
        """A row -> the chain's Upload (its header read: cheap; pixels later, within the budget), or why not."""
        idx, row = item
        try:
            headers = inputs.request_headers(self.context, idx)
            parsed = inputs.read_row(row, headers, self.settings.image_limits, self.chain.max_topk, self.settings.topk)
            return self.chain.open(parsed.image_bytes, parsed.options)
        except InputError as err:
            return err

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        if batch.prepared:
            started = time.perf_counter()
            self.chain.forward(batch)
            self._stage_time("inference", started, len(batch.prepared))
        return batch

    def postprocess(self, batch: Batch) -> list:
        responses = []
        for idx, result in enumerate(self.chain.answers(batch)):
            if isinstance(result, InputError):
                responses.append(self._refuse(idx, result))
            else:
                responses.append(inputs.shaped(result, batch.options[idx]))
                metrics.add_answer(self.context.metrics, result)
        logger.info("batch of %d request(s), %d refused", batch.size, len(batch.errors))  # for people reading the log
        return responses

    def explain_handle(self, data_preprocess: Batch, raw_data) -> list:
        """Integrated Gradients for each good image, towards its top-1 class (or a `target` field)."""
        batch = self.inference(data_preprocess)
        responses = {idx: self._refuse(idx, err) for idx, err in batch.errors.items()}
        if batch.forward is not None:
            targets = [inputs.explain_target(raw_data[idx]) for idx in batch.positions]
            explanations = self.chain.predictor.explain(batch.forward, targets, self.settings.ig_steps)
            for idx, explanation in zip(batch.positions, explanations, strict=True):
                responses[idx] = explanation.to_dict()
        return [responses[idx] for idx in range(batch.size)]

    # ------------------------------------------------------------------ refusals and metrics

    def _refuse(self, idx: int, err: StatusError) -> dict:
        """The error's status on its request (Retry-After when it is worth another try), its JSON as the body."""
        if inputs.has_request(self.context, idx):
            self.context.set_response_status(err.status, err.message, idx)
            if retry_after := getattr(err, "retry_after_s", None):
                self.context.set_response_header(idx, "Retry-After", str(retry_after))
        if isinstance(err, InputError):
            metrics.add_refusal(self.context.metrics, err.status)
        return err.to_json()

    def _stage_time(self, stage: str, started: float, images: int) -> None:
        if self.context is not None:
            metrics.add_stage_time(self.context.metrics, stage, time.perf_counter() - started, images)
