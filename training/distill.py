"""Knowledge distillation: trained classifiers (the teachers) answer every training batch too, and the
student learns their averaged answer, not only the label: which classes the car could also be. Two
teachers that err on different cars average into a better answer than either (an ensemble), which
the student then learns at its own cost.

Each teacher sees the same augmented images as the student, resized to the size it trained at (the same
view: the consistency that makes distillation work, Beyer et al., 2022), in eval mode and without
gradients. The term is Hinton et al.'s: the KL divergence from the teachers' answer to the student's,
both softened by a temperature T, times T² so that its gradients keep their scale as T changes.

    python -m training.train --config training/configs/efficientnet_lite0.yaml \\
        --distill_from runs/efficientnet_lite2_teacher,runs/other_teacher
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carmodel import models as model_lib
from training import config as config_lib


class TeacherError(ValueError):
    pass


class Teacher:
    """One trained classifier, frozen, that answers at the size it trained at."""

    def __init__(self, net: nn.Module, size: int):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad = False
        self.size = size

    @classmethod
    def load(cls, run_dir: str | Path, classes: list[str], device) -> Teacher:
        """A finished training run (config.yaml, classes.json, best.pth) whose classes are `classes`."""
        run_dir = Path(run_dir)
        for name in ("config.yaml", "classes.json", "best.pth"):
            if not (run_dir / name).is_file():
                raise TeacherError(f"teacher {run_dir}: {name} not found (distill_from names finished runs)")
        if json.loads((run_dir / "classes.json").read_text()) != classes:
            raise TeacherError(f"teacher {run_dir} was trained on other classes than this run's")
        cfg = config_lib.load(run_dir / "config.yaml")
        if cfg.model.localizes:
            raise TeacherError(f"teacher {run_dir} has a box head; a teacher is a plain classifier (stage 1)")
        net, _ = model_lib.build_model(cfg.model.arch, len(classes), str(run_dir / "best.pth"), cfg.model.dropout)
        return cls(net.to(device), cfg.augment.train_size)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.net(images).float()


class Distillation:
    """The teachers' term of the loss."""

    def __init__(self, teachers: list[Teacher], temperature: float):
        if not teachers:
            raise TeacherError("distillation needs at least one teacher")
        self.teachers, self.temperature = teachers, temperature

    @classmethod
    def load(cls, runs: tuple[str, ...], classes: list[str], temperature: float, device) -> Distillation:
        return cls([Teacher.load(run, classes, device) for run in runs], temperature)

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The teachers' softened answers, averaged as probabilities; as log-probabilities."""
        answers = torch.stack([F.log_softmax(t.logits(images) / self.temperature, dim=1) for t in self.teachers])
        return torch.logsumexp(answers, dim=0) - math.log(len(self.teachers))

    def loss(self, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """T² KL(teachers || student) at temperature T, averaged over the batch."""
        t = self.temperature
        student = F.log_softmax(student_logits.float() / t, dim=1)
        return t * t * F.kl_div(student, self.target(images), reduction="batchmean", log_target=True)
