"""Knowledge distillation: a larger trained classifier (the teacher) answers every training batch too,
and the student learns its whole answer, not only the label: which classes the car could also be.

The teacher sees the same augmented images as the student, resized to the size it trained at (the
same view: the consistency that makes distillation work, Beyer et al., 2022), in eval mode and without
gradients. The term is Hinton et al.'s: the KL divergence between both answers softened by a
temperature T, times T² so that its gradients keep their scale as T changes.

    python -m training.train --config training/configs/efficientnet_lite0.yaml \\
        --distill_from runs/efficientnet_lite2_teacher
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carmodel import models as model_lib
from training import config as config_lib


class TeacherError(ValueError):
    pass


class Teacher:
    def __init__(self, net: nn.Module, size: int, temperature: float):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad = False
        self.size, self.temperature = size, temperature

    @classmethod
    def load(cls, run_dir: str | Path, classes: list[str], temperature: float, device) -> Teacher:
        """A finished training run (config.yaml, classes.json, best.pth) whose classes are `classes`."""
        run_dir = Path(run_dir)
        for name in ("config.yaml", "classes.json", "best.pth"):
            if not (run_dir / name).is_file():
                raise TeacherError(f"teacher {run_dir}: {name} not found (distill_from names a finished run)")
        if json.loads((run_dir / "classes.json").read_text()) != classes:
            raise TeacherError(f"teacher {run_dir} was trained on other classes than this run's")
        cfg = config_lib.load(run_dir / "config.yaml")
        if cfg.model.localizes:
            raise TeacherError(f"teacher {run_dir} has a box head; a teacher is a plain classifier (stage 1)")
        net, _ = model_lib.build_model(cfg.model.arch, len(classes), str(run_dir / "best.pth"), cfg.model.dropout)
        return cls(net.to(device), cfg.augment.train_size, temperature)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net(images).float()

    def loss(self, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """T² KL(teacher || student) at temperature T, averaged over the batch."""
        t = self.temperature
        teacher = F.log_softmax(self.logits(images) / t, dim=1)
        student = F.log_softmax(student_logits.float() / t, dim=1)
        return t * t * F.kl_div(student, teacher, reduction="batchmean", log_target=True)
