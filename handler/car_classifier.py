"""TorchServe handler for the Stanford Cars classifier.

Subclasses the stock `ImageClassifier` and overrides only what differs:

* model loading: the architecture from the export's config (handler/model.py), weights_only;
* preprocessing: `training.presets.ClassificationPresetEval`, the exact transform used to
  evaluate the model, read from the packed training code - never a second copy;
* input handling: raw body, multipart field or base64 JSON, any image mode, EXIF orientation,
  size and pixel limits (handler/image_input.py); each bad item in a batch gets its own 4xx
  JSON error while its neighbours get their predictions;
* response: top-k `[{class_id, class_name, probability}]`, best first; per request via an
  `X-Top-K` header, or a `topk` multipart/JSON field;
* explanations: Integrated Gradients per image as a 2-D heat map;
* inference: the fast path of handler/fast_path.py (OpenVINO, bf16 where the CPU has it),
  compiled at load; the torch model stays for explanations;
* metrics: preprocess/inference time, predictions per class, top-1 confidence, input errors.

Settings come from the `handler:` section of the model's model-config.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.image_classifier import ImageClassifier

from handler.batch import Batch
from handler.fast_path import int8_model_path, make_runner
from handler.image_input import InputError, Limits, read_request
from handler.model import load_model
from training import config as config_lib
from training import presets

logger = logging.getLogger(__name__)
TOPK_HEADER = "x-top-k"


def content_types(headers: dict) -> dict[str, str]:
    """TorchServe files each field's Content-Type under the field's name: {"body": {"content-type": ...}}."""
    return {name: value.get("content-type") for name, value in headers.items() if isinstance(value, dict)}


class CarClassifier(ImageClassifier):
    load_error: str | None = None

    def initialize(self, context):
        """Load the model; if that fails, stay up and answer every request with a 503 that says why.

        TorchServe 0.12 restarts a worker whose initialize raises, forever, and requests queued for
        the model wait for it with no answer (seen: clients hanging until their own timeout). A
        worker that reports the failure answers them at once, and `scripts/serve.py` reads the
        reason from the model's description (`GET /models/<name>?customized=true`).
        """
        try:
            self._load(context)
        except Exception as err:  # any failure to load: a corrupt .pth, a missing module, OOM
            logger.exception("%s failed to load; answering 503 to every request", context.model_name)
            self.context = context
            self.load_error = f"model failed to load: {type(err).__name__}: {str(err)[:300]}"
            self.initialized = True

    def _load(self, context):
        model_dir = Path(context.system_properties["model_dir"])
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        limit_fields = {f.name for f in dataclasses.fields(Limits)}
        self.limits = Limits(**{k: v for k, v in settings.items() if k in limit_fields})
        self.topk = int(settings.get("topk", 5))
        self.ig_steps = int(settings.get("ig_steps", 16))
        self.cfg = config_lib.load(model_dir / "config.yaml")
        self.image_processing = presets.eval_preset(self.cfg)
        super().initialize(context)
        # VisionHandler lifts PIL's decompression-bomb guard; put it back at our own limit.
        Image.MAX_IMAGE_PIXELS = self.limits.max_pixels
        self.model = self.model.to(memory_format=torch.channels_last)
        # Compiled and warmed up here: first-request latency belongs to model load, not to a user.
        backend = settings.get("backend", "auto") if self.device.type == "cpu" else "torch"  # OpenVINO: CPU only
        threads = int(settings.get("threads", 0))
        self.decode_pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="decode")
        self.runner = make_runner(
            self.model,
            self.cfg.eval_size,
            backend,
            settings.get("precision", "auto"),
            int8_model_path(model_dir, self.cfg.model_name),
            threads,
        )
        logger.info(
            "%s ready: arch=%s classes=%d eval_size=%d backend=%s precision=%s threads=%s limits=%s",
            context.model_name,
            self.cfg.arch,
            len(self.mapping),
            self.cfg.eval_size,
            self.runner.backend,
            self.runner.precision,
            threads or "all",
            self.limits,
        )

    def handle(self, data, context):
        if self.load_error is None:
            return super().handle(data, context)
        self.context = context
        if self._is_describe():
            return [self.describe_handle()]
        return [self._load_error_response(idx) for idx in range(len(data))]

    def _load_error_response(self, idx: int) -> dict:
        self.context.set_response_status(503, self.load_error, idx)
        return {"code": 503, "type": "ModelLoadError", "message": self.load_error}

    def describe_handle(self):
        return {"load_error": self.load_error}

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        return load_model(model_dir, model_pt_path, self.device)

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
        batch.preprocess_ms = self._add_time("PreprocessTime", started)
        return batch

    def _prepare(self, idx: int, row) -> tuple[torch.Tensor, int] | InputError:
        try:
            headers = self._headers(idx)
            image, topk = read_request(self._with_header_topk(headers, row), self.limits, content_types(headers))
            return self.image_processing(image), min(topk or self.topk, len(self.mapping))
        except InputError as err:
            return err

    def _headers(self, idx: int) -> dict:
        return (self.context.get_all_request_header(idx) if self._is_request(idx) else None) or {}

    def _is_request(self, idx: int) -> bool:
        """Under a KServe envelope one request carries several images: the items past the first have
        no HTTP request of their own (no headers, no status; their errors go in the response body)."""
        return self.context is not None and idx < len(self.context.request_processor or [])

    def _with_header_topk(self, headers: dict, row):
        """TorchServe 0.12 does not pass query strings to handlers: `X-Top-K` works with curl -T."""
        value = next((v for k, v in headers.items() if k.lower() == TOPK_HEADER), None)
        if value is None or not isinstance(row, dict) or "topk" in row:
            return row
        return {**row, "topk": value}

    def inference(self, batch: Batch, *args, **kwargs):
        if batch.tensors:
            started = time.perf_counter()
            batch.logits = self.runner.run(torch.stack(batch.tensors))
            batch.inference_ms = self._add_time("InferenceTime", started)
        return batch

    # ------------------------------------------------------------------ tensors -> responses

    def postprocess(self, batch: Batch):
        responses = {idx: self._error_response(idx, err) for idx, err in batch.errors.items()}
        if batch.logits is not None:
            probabilities = F.softmax(batch.logits, dim=1)
            for row, idx in enumerate(batch.positions):
                probs, classes = torch.topk(probabilities[row], batch.topk[idx])
                responses[idx] = [self._prediction(int(c), float(p)) for p, c in zip(probs, classes, strict=True)]
                self._record_prediction(responses[idx][0])
        # One line per batch; bench/stages.py reads it to split a worker's time between stages.
        logger.info(
            "batch of %d request(s), %d refused: preprocess %.1f ms, inference %.1f ms",
            batch.size,
            len(batch.errors),
            batch.preprocess_ms,
            batch.inference_ms,
        )
        return [responses[idx] for idx in range(batch.size)]

    def _prediction(self, class_id: int, probability: float) -> dict:
        return {"class_id": class_id, "class_name": self.mapping[str(class_id)], "probability": round(probability, 6)}

    def _error_response(self, idx: int, err: InputError) -> dict:
        if self._is_request(idx):
            self.context.set_response_status(err.status, err.message, idx)
        self._metrics().add_counter("InputErrors", 1, None, [Dimension("Status", str(err.status))])
        return err.to_json()

    # ------------------------------------------------------------------ explanations

    def explain_handle(self, data_preprocess: Batch, raw_data):
        """Integrated Gradients for each good image, towards its top-1 class (or `target`)."""
        batch = self.inference(data_preprocess)
        results = {idx: self._error_response(idx, err) for idx, err in batch.errors.items()}
        for row, idx in enumerate(batch.positions):
            target = self._explain_target(raw_data[idx], batch.logits[row])
            inputs = batch.tensors[row].unsqueeze(0).to(self.device).requires_grad_()
            attributions = self.ig.attribute(inputs, target=target, n_steps=self.ig_steps)
            heatmap = attributions.squeeze(0).abs().sum(0)
            heatmap = heatmap / heatmap.max().clamp_min(1e-12)
            results[idx] = {
                **self._prediction(target, float(F.softmax(batch.logits[row], 0)[target])),
                "heatmap": [[round(v, 4) for v in line] for line in heatmap.tolist()],
            }
        return [results[idx] for idx in range(batch.size)]

    def _explain_target(self, row, logits) -> int:
        raw = row.get("target") if isinstance(row, dict) else None
        try:
            target = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
        except (TypeError, ValueError):
            return int(logits.argmax())
        return target if 0 <= target < len(self.mapping) else int(logits.argmax())

    # ------------------------------------------------------------------ metrics

    def _metrics(self):
        return self.context.metrics

    def _add_time(self, name: str, started: float) -> float:
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        if self.context is not None:
            self._metrics().add_time(name, elapsed_ms, None, "ms")
        return elapsed_ms

    def _record_prediction(self, top1: dict):
        metrics = self._metrics()
        metrics.add_counter("PredictionsPerClass", 1, None, [Dimension("ClassName", top1["class_name"])])
        metrics.add_metric("Top1Confidence", top1["probability"], "percent", None, [], MetricTypes.HISTOGRAM)
