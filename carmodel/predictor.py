"""The inference chain, once: image -> eval preset -> runner -> top-k.

The TorchServe handler, the in-process benchmark, the parity check, int8 calibration's check
and training's evaluation all run a model through a `Predictor`, so a change here (a new stage,
another preset) reaches every one of them.

    predictor = Predictor.for_export(ExportDir("models/efficientnet_lite0_cars"))
    predictor.predict([Image.open("car.jpg").convert("RGB")], k=5)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from carmodel.config import ModelConfig
from carmodel.export import ExportDir
from carmodel.presets import eval_preset
from carmodel.runners import Runner, make_runner


@dataclass(frozen=True)
class Prediction:
    class_id: int
    class_name: str
    probability: float

    def to_dict(self) -> dict:
        return {"class_id": self.class_id, "class_name": self.class_name, "probability": round(self.probability, 6)}


class Predictor:
    def __init__(self, model: torch.nn.Module, config: ModelConfig, classes: list[str], runner: Runner):
        self.model = model  # the eager reference: explanations need its gradients
        self.config = config
        self.classes = classes
        self.runner = runner
        self.preprocess = eval_preset(config)

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
        return cls(model, config, export.classes(), runner)

    @property
    def engine(self) -> str:
        return f"{self.runner.backend} {self.runner.precision}"

    def logits(self, tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Preprocessed images (a list, or a stacked batch) -> float logits, one row per image."""
        batch = tensors if isinstance(tensors, torch.Tensor) else torch.stack(list(tensors))
        return self.runner.run(batch)

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

    def predict(self, images: Sequence[Image.Image], k: int = 5) -> list[list[Prediction]]:
        return self.top_k(self.logits([self.preprocess(image) for image in images]), k)
