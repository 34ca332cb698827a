"""TorchServe handler for the Stanford Cars classifier: the TorchServe adapter, nothing more.

Subclasses the stock `ImageClassifier` and overrides only what differs. The inference chain
itself (eval preset, runner, top-k) is carmodel's `Predictor`; here is what TorchServe adds:

* loading from the unpacked archive (carmodel.export.ExportDir), weights_only; a model that
  cannot load answers 503 with the reason instead of restarting forever;
* request rows -> images (serving/requests.py): raw body, multipart field or base64 JSON; each
  bad item in a batch gets its own 4xx JSON error while its neighbours get their predictions;
* top-k per request: an `X-Top-K` header, or a `topk` multipart/JSON field;
* the car's box, when the model localises and the request asks (`X-Box: true`, or a `box`
  field): the answer becomes {"predictions": [...], "box": [x1, y1, x2, y2]} in the uploaded
  image's pixels; without asking, the answer is the top-k list as always;
* explanations: Integrated Gradients per image as a 2-D heat map;
* metrics (config/metrics.yaml) and a description (`GET /models/<name>?customized=true`) with
  the engine and settings in use.

Settings: the `handler:` section of the archive's model-config.yaml (serving/settings.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.nn.functional as F
from captum.attr import IntegratedGradients
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.image_classifier import ImageClassifier
from ts.utils.util import PredictionException

from carmodel.export import ExportDir
from carmodel.images import InputError, uploaded_size
from carmodel.predictor import Predictor, Prepared
from serving import metrics as names
from serving import oip
from serving.batch import Batch
from serving.requests import read_request
from serving.settings import HandlerSettings

logger = logging.getLogger(__name__)
oip.install()  # before TorchServe builds the `kservev2` envelope (KServe's v2 protocol) around this handler
# TorchServe 0.12 does not pass query strings to handlers: these headers stand in for the fields.
OPTION_HEADERS = {"x-top-k": "topk", "x-box": "box"}
STREAM_NEXT_HEADER = "ts_stream_next"  # TorchServe's: "true" while a streamed answer has more parts
# HTTP statuses the gRPC front end would map to FAILED_PRECONDITION: a bad image is an invalid argument
GRPC_BATCH_STATUS = {415: 400, 422: 400}


def content_types(headers: dict) -> dict[str, str]:
    """TorchServe files each field's Content-Type under the field's name: {"body": {"content-type": ...}}."""
    return {name: value.get("content-type") for name, value in headers.items() if isinstance(value, dict)}


def http_headers(headers: dict) -> dict[str, str]:
    """The HTTP headers among a request's (every HTTP request has some: Host, Content-Length, ...); a
    gRPC call has none, only each input's content type (a dict, see `content_types`)."""
    return {name: value for name, value in headers.items() if isinstance(value, str)}


class CarClassifier(ImageClassifier):
    load_error: str | None = None
    predictor: Predictor | None = None

    def initialize(self, context):
        """Load the model; if that fails, stay up and answer every request with a 503 that says why.

        TorchServe 0.12 restarts a worker whose initialize raises, forever, and requests queued for
        the model wait for it with no answer (seen: clients hanging until their own timeout). A
        worker that reports the failure answers them at once, and serving/torchserve.py reads the
        reason from the model's description.
        """
        try:
            self._load(context)
        except Exception as err:  # any failure to load: a corrupt .pth, a missing module, OOM
            logger.exception("%s failed to load; answering 503 to every request", context.model_name)
            self.context = context
            self.load_error = f"model failed to load: {type(err).__name__}: {str(err)[:300]}"
            self.initialized = True

    def _load(self, context):
        self.settings = HandlerSettings.from_section((getattr(context, "model_yaml_config", None) or {}).get("handler"))
        self.export = ExportDir(Path(context.system_properties["model_dir"]))
        super().initialize(context)  # device, then our _load_pickled_model, then captum's IG
        # VisionHandler lifts PIL's decompression-bomb guard; put it back at our own limit.
        Image.MAX_IMAGE_PIXELS = self.settings.max_pixels
        backend = self.settings.backend if self.device.type == "cpu" else "torch"  # OpenVINO: CPU only
        # Compiled and warmed up here: first-request latency belongs to model load, not to a user.
        self.predictor = Predictor.for_export(
            self.export, backend, self.settings.precision, self.settings.threads, model=self.model
        )
        self.model = self.predictor.model
        self.ig = IntegratedGradients(self.predictor.classifier)  # the logits alone, without the box
        self.max_topk = self.settings.largest_topk(len(self.predictor.classes))
        self.decode_pool = ThreadPoolExecutor(self.settings.threads or os.cpu_count() or 1, thread_name_prefix="decode")
        logger.info("%s ready: %s", context.model_name, self.description())

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        return self.export.load_model(self.device)

    def description(self) -> dict:
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
            "pid": os.getpid(),
            "settings": dataclasses.asdict(self.settings),
        }

    def describe_handle(self):
        return self.description()

    def handle(self, data, context):
        if self.load_error is None:
            responses = super().handle(data, context)
        else:
            self.context = context
            if self._is_describe():
                return [self.describe_handle()]
            responses = [self._load_error_response(idx) for idx in range(len(data))]
        self._fail_a_lone_grpc_error(responses)
        self._end_streams(len(data))
        return responses

    def _fail_a_lone_grpc_error(self, responses: list) -> None:
        """A gRPC request refused alone in its batch becomes a non-OK gRPC status. TorchServe 0.12's gRPC
        front end drops the per-request status (the answer is OK with our JSON error inside) and keeps
        only a batch's: a batch of one can fail as a whole without costing a neighbour its answer.
        4xx map to INVALID_ARGUMENT (413: RESOURCE_EXHAUSTED), 503 to UNAVAILABLE."""
        if len(responses) != 1 or not oip.is_error(responses[0]) or not self._is_grpc(0):
            return
        code = responses[0]["code"]
        raise PredictionException(responses[0]["message"], GRPC_BATCH_STATUS.get(code, code))

    def _is_grpc(self, idx: int) -> bool:
        return self._is_request(idx) and not http_headers(self._headers(idx))

    def _end_streams(self, size: int) -> None:
        """A gRPC answer is whole: mark it the last part of its stream. TorchServe 0.12's gRPC
        StreamPredictions reads this header of every answer and fails the worker when it is missing;
        over HTTP the same header would turn the answer into a chunked stream, so only gRPC gets it."""
        for idx in range(size):
            if self._is_grpc(idx):
                self.context.set_response_header(idx, STREAM_NEXT_HEADER, "false")

    def _load_error_response(self, idx: int) -> dict:
        self.context.set_response_status(503, self.load_error, idx)
        return {"code": 503, "type": "ModelLoadError", "message": self.load_error}

    # ------------------------------------------------------------------ request -> tensors

    def preprocess(self, data):
        started = time.perf_counter()
        batch = Batch(len(data))
        # Decoding in threads: PIL and the transforms release the GIL, so a batch's images decode
        # side by side instead of one core idling while the other decodes (bench/README.md, profile).
        for idx, prepared in enumerate(self.decode_pool.map(self._prepare, range(len(data)), data)):
            if isinstance(prepared, InputError):
                batch.errors[idx] = prepared
            else:
                batch.add(idx, *prepared)
        self._add_stage_time("preprocess", started, len(data))
        return batch

    def _prepare(self, idx: int, row) -> tuple[Prepared, int, bool] | InputError:
        try:
            headers = self._headers(idx)
            request = read_request(
                self._with_header_options(headers, row),
                self.settings.image_limits,
                self.max_topk,
                content_types(headers),
                self.predictor.decode_side,
            )
            return self.predictor.prepare(request.image), request.topk or self.settings.topk, bool(request.box)
        except InputError as err:
            return err

    def _headers(self, idx: int) -> dict:
        return (self.context.get_all_request_header(idx) if self._is_request(idx) else None) or {}

    def _is_request(self, idx: int) -> bool:
        """Under a KServe envelope one request carries several images: the items past the first have
        no HTTP request of their own (no headers, no status; their errors go in the response body)."""
        return self.context is not None and idx < len(self.context.request_processor or [])

    def _with_header_options(self, headers: dict, row):
        """`X-Top-K` and `X-Box` as if they were fields (a field of the request itself wins), so they
        work with curl -T."""
        if not isinstance(row, dict):
            return row
        given = {OPTION_HEADERS[k.lower()]: v for k, v in headers.items() if k.lower() in OPTION_HEADERS}
        return {**given, **row}

    def inference(self, batch: Batch, *args, **kwargs):
        if batch.prepared:
            started = time.perf_counter()
            batch.forward = self.predictor.run(batch.prepared, map=self.decode_pool.map)
            self._add_stage_time("inference", started, len(batch.prepared))
        return batch

    # ------------------------------------------------------------------ tensors -> responses

    def postprocess(self, batch: Batch):
        responses = {idx: self._error_response(idx, err) for idx, err in batch.errors.items()}
        if batch.forward is not None:
            answers = self.predictor.top_k(batch.forward.logits, [batch.topk[idx] for idx in batch.positions])
            boxes = batch.forward.boxes or [None] * len(answers)
            for idx, answer, box in zip(batch.positions, answers, boxes, strict=True):
                predictions = [p.to_dict() for p in answer]
                # the box only when asked for: clients reading the plain top-k list keep working
                responses[idx] = (
                    {"predictions": predictions, "box": box and list(box)} if idx in batch.box else predictions
                )
                self._record_prediction(answer[0])
        # For people reading the log (how requests met in batches); stage timings are on the metrics endpoint.
        logger.info("batch of %d request(s), %d refused", batch.size, len(batch.errors))
        return [responses[idx] for idx in range(batch.size)]

    def _error_response(self, idx: int, err: InputError) -> dict:
        if self._is_request(idx):
            self.context.set_response_status(err.status, err.message, idx)
        self._metrics().add_counter(names.INPUT_ERRORS, 1, None, [Dimension("status", str(err.status))])
        return err.to_json()

    # ------------------------------------------------------------------ explanations

    def explain_handle(self, data_preprocess: Batch, raw_data):
        """Integrated Gradients for each good image, towards its top-1 class (or `target`)."""
        batch = self.inference(data_preprocess)
        results = {idx: self._error_response(idx, err) for idx, err in batch.errors.items()}
        logits = batch.forward.logits if batch.forward is not None else None
        for row, idx in enumerate(batch.positions):
            target = self._explain_target(raw_data[idx], logits[row])
            # what was classified: with a box head, the car cut from the photo
            inputs = batch.forward.inputs[row].unsqueeze(0).to(self.device).requires_grad_()
            attributions = self.ig.attribute(inputs, target=target, n_steps=self.settings.ig_steps)
            heatmap = attributions.squeeze(0).abs().sum(0)
            heatmap = heatmap / heatmap.max().clamp_min(1e-12)
            probability = float(F.softmax(logits[row].float(), 0)[target])
            results[idx] = {
                "class_id": target,
                "class_name": self.predictor.classes[target],
                "probability": round(probability, 6),
                "heatmap": [[round(v, 4) for v in line] for line in heatmap.tolist()],
            }
            if batch.forward.boxes is not None:  # the heat map covers the car cut out, not the whole photo
                region = self.predictor.region(uploaded_size(batch.prepared[row].image), batch.forward.boxes[row])
                results[idx]["region"] = list(region)
        return [results[idx] for idx in range(batch.size)]

    def _explain_target(self, row, logits) -> int:
        raw = row.get("target") if isinstance(row, dict) else None
        try:
            target = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        except (TypeError, ValueError):
            return int(logits.argmax())
        return target if 0 <= target < len(self.predictor.classes) else int(logits.argmax())

    # ------------------------------------------------------------------ metrics

    def _metrics(self):
        return self.context.metrics

    def _add_stage_time(self, stage: str, started: float, images: int) -> None:
        """A histogram of the batch's seconds, plus running totals (counters) from which a scraper
        such as bench/stages.py derives the time per image and the batch size of each stage."""
        elapsed = time.perf_counter() - started
        if self.context is None:
            return
        metrics, dims = self._metrics(), [Dimension("stage", stage)]
        metrics.add_time(names.STAGE_SECONDS_HISTOGRAM[stage], elapsed, None, "s", [], MetricTypes.HISTOGRAM)
        metrics.add_counter(names.STAGE_SECONDS, elapsed, None, dims)
        metrics.add_counter(names.STAGE_IMAGES, images, None, dims)
        metrics.add_counter(names.STAGE_BATCHES, 1, None, dims)

    def _record_prediction(self, top1):
        metrics = self._metrics()
        metrics.add_counter(names.PREDICTIONS, 1, None, [Dimension("class_name", top1.class_name)])
        metrics.add_metric(names.TOP1_PROBABILITY, top1.probability, "probability", None, [], MetricTypes.HISTOGRAM)
