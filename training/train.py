"""Train a Stanford Cars classifier.

Writes to ``--output_dir``: ``best.pth`` (state_dict with the lowest val loss; with
``--fit_on train+val``, the last epoch's; with ``--ema_decay``, the weights' moving average),
``checkpoint.pt`` (every epoch: ``--resume auto`` continues an interrupted run of the same config where it
stopped, and does nothing for a finished one), ``metrics.csv``/``metrics.json``
(one row per epoch), ``curves.png``, ``config.yaml``, ``classes.json``, ``split.json``.

    python -m training.train --config training/configs/efficientnet_lite0.yaml
    python -m training.train --config training/configs/resnet50.yaml --epochs 20 --device cuda
    python -m training.train --config training/configs/efficientnet_lite0.yaml --fit_on train  # find the epochs on val
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import random
import re
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from carmodel import models as model_lib
from carmodel import presets, vehicles
from carmodel.errors import exit_with
from training import config as config_lib
from training import data, plots, tracking
from training.config import Config, OptimConfig, RuntimeConfig
from training.distill import Distillation
from training.model import build_for, count_parameters, freeze, train_mode

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.pth"
RUN_ARTIFACTS = ("config.yaml", "split.json", "metrics.csv", "curves.png", "train_summary.json")


# ----------------------------------------------------------------------------- runtime


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the machine's accelerator (CUDA, MPS, ...) when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")


def cpu_supports_bf16() -> bool:
    # True on CPUs with AVX512-BF16 or AMX, where oneDNN runs bf16 convolutions natively.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class Hardware:
    """Where and how the network runs: the runtime settings resolved against this machine."""

    device: torch.device
    dtype: torch.dtype | None  # autocast's dtype; None runs in float32
    channels_last: bool

    @classmethod
    def resolve(cls, runtime: RuntimeConfig) -> Hardware:
        device = pick_device(runtime.device)
        return cls(device, amp_dtype(runtime.amp, device), runtime.channels_last and device.type != "mps")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def batch(self, inputs: torch.Tensor, channels_last: bool) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        return inputs.contiguous(memory_format=torch.channels_last) if channels_last and inputs.dim() == 4 else inputs


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- data


def is_final_fit(cfg: Config) -> bool:
    """train+val: nothing is held out to select on; the schedule's last epoch is the model."""
    return cfg.data.fit_on == "train+val"


def prepare_data(cfg: Config):
    """Scan, split and (optionally) decode once. Every data problem surfaces here, not mid-epoch."""
    index = data.scan(cfg.data.data_root, cfg.data.layout)
    splits = data.make_splits(index, cfg.data)
    if is_final_fit(cfg):
        splits = {"train": splits["train"] + splits["val"], "val": [], "test": splits["test"]}
    images = {}
    for name in ("train", "val"):
        decoded = data.decode_all(splits[name], cfg.data.crop_to_bbox, cfg.runtime.progress)
        # without the cache, everything is still decoded once so a corrupt file is found now, not in epoch 7
        images[name] = decoded if cfg.data.cache_images else None
    return index, splits, images


def checkpoint_to_resume(cfg: Config, out: Path) -> Path | None:
    """`--resume auto`: the run folder's checkpoint, when the run it holds had this same config (the
    runtime section aside: a rerun may use another device); otherwise None, and the run starts over.
    Any other value is a checkpoint's path."""
    if cfg.runtime.resume != "auto":
        return Path(cfg.runtime.resume) if cfg.runtime.resume else None
    checkpoint, recorded = out / CHECKPOINT, out / "config.yaml"
    if not (checkpoint.is_file() and recorded.is_file()):
        return None
    if not same_recipe(config_lib.load(recorded), cfg):
        log.info("%s holds a run of another config: starting over", out)
        return None
    start = Path(cfg.finetune.pretrained)
    if start.is_file() and start.stat().st_mtime > checkpoint.stat().st_mtime:  # the same path, newer weights
        log.info("%s is newer than %s's checkpoint (the stage it starts from was retrained): starting over", start, out)
        return None
    return checkpoint


def same_recipe(a: Config, b: Config) -> bool:
    """The same training, whatever the runtime, and whatever heads later steps added (the detector)."""

    def recipe(cfg: Config) -> Config:
        model = dataclasses.replace(cfg.model, car_head=False, detect_size=(0, 0))
        return dataclasses.replace(cfg, runtime=config_lib.RuntimeConfig(), model=model)

    return recipe(a) == recipe(b)


def write_run_record(cfg: Config, index: data.CarsIndex, splits: dict, out: Path) -> None:
    """config.yaml, classes.json, split.json: what the run was, before it starts."""
    cfg.save(out / "config.yaml")
    (out / "classes.json").write_text(json.dumps(index.classes, indent=1))
    (out / "split.json").write_text(json.dumps(data.split_manifest(index, splits, cfg.data.data_root), indent=1))


def make_loader(dataset, cfg: Config, shuffle: bool, generator=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size,
        shuffle=shuffle,
        num_workers=cfg.runtime.num_workers,
        generator=generator,
        persistent_workers=cfg.runtime.num_workers > 0,
    )


# ----------------------------------------------------------------------------- model


def setup_model(cfg: Config, num_classes: int, hw: Hardware) -> tuple[nn.Module, list[nn.Module], str]:
    """(model on its device, its frozen blocks, the init actually used)."""
    model, init = build_for(cfg.model, num_classes, cfg.finetune.pretrained)
    frozen = freeze(model, cfg.model.arch, cfg.finetune.unfreeze)
    model.to(hw.device)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    total, trainable = count_parameters(model)
    log.info(
        "device=%s amp=%s channels_last=%s params=%s trainable=%s init=%s",
        hw.device,
        hw.dtype,
        hw.channels_last,
        f"{total:,}",
        f"{trainable:,}",
        init,
    )
    return model, frozen, init


class Objective:
    """The loss of one batch: (loss, logits to score, their labels). This one: cross-entropy, plus
    (`make_loss_weight`) the negative log of the probability summed over the true class's make: what
    the answer's make is read from, so the classes of one make learn to hold their mass together."""

    def __init__(self, optim: OptimConfig, makes: list[int] | None = None, teachers: Distillation | None = None):
        # Val loss is this same objective (label smoothing included), as in torchvision's references:
        # plain cross-entropy rises as a smoothed model keeps getting more photos right, so early
        # stopping on it stopped our first full run at 81 % val accuracy while accuracy was still climbing.
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.make_weight = optim.make_loss_weight if makes is not None else 0.0
        self.make_of = torch.tensor(makes) if self.make_weight else None  # each class's make
        self.teachers, self.distill_weight = teachers, optim.distill_weight

    def classes_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.cross_entropy(logits.float(), labels)
        if self.make_weight:
            loss = loss + self.make_weight * self.make_loss(logits.float(), labels)
        return loss

    def make_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        make_of = self.make_of.to(logits.device)
        members = make_of.unsqueeze(0) == torch.arange(int(make_of.max()) + 1, device=logits.device).unsqueeze(1)
        log_probs = torch.log_softmax(logits, dim=1).unsqueeze(1)  # [B, 1, classes]
        make_log_probs = torch.logsumexp(log_probs.masked_fill(~members, -torch.inf), dim=2)  # [B, makes]
        return nn.functional.nll_loss(make_log_probs, make_of[labels])

    def taught(self, loss: torch.Tensor, logits: torch.Tensor, images: torch.Tensor, hw: Hardware) -> torch.Tensor:
        """The labels' loss mixed with the teachers' term while training; val loss stays the labels'
        alone, comparable with a run that had no teacher."""
        if self.teachers is None or not torch.is_grad_enabled():
            return loss
        with hw.autocast():
            distilled = self.teachers.loss(logits, images)
        return (1 - self.distill_weight) * loss + self.distill_weight * distilled

    def __call__(self, net, inputs, targets, hw: Hardware, channels_last: bool):
        inputs, targets = hw.batch(inputs, channels_last), targets.to(hw.device, non_blocking=True)
        with hw.autocast():
            logits = net(inputs)
        return self.taught(self.classes_loss(logits, targets), logits, inputs, hw), logits, targets


class ClassifyAndLocate(Objective):
    """For a Localizer: the car's class from the car, plus its box (smooth L1, where the box is
    trusted) and its class again from the whole image the box was found in."""

    def __init__(self, optim: OptimConfig, makes: list[int] | None = None, teachers: Distillation | None = None):
        super().__init__(optim, makes, teachers)
        self.box_weight, self.whole_weight = optim.box_loss_weight, optim.whole_image_loss_weight

    def __call__(self, net, inputs, targets, hw: Hardware, channels_last: bool):
        car, whole = (hw.batch(x, channels_last) for x in inputs)
        labels, boxes, weights = (t.to(hw.device, non_blocking=True) for t in targets)
        with hw.autocast():
            logits = net(car)[0]
            whole_logits, found = net(whole)[:2]
        box_loss = nn.functional.smooth_l1_loss(found.float(), boxes, beta=0.05, reduction="none").sum(1)
        box_loss = (box_loss * weights).sum() / weights.sum().clamp_min(1)
        loss = (
            self.taught(self.classes_loss(logits, labels), logits, car, hw)
            + self.box_weight * box_loss
            + self.whole_weight * self.cross_entropy(whole_logits.float(), labels)
        )
        return loss, logits, labels


def make_objective(cfg: Config, classes: list[str], hw: Hardware) -> Objective:
    makes = vehicles.groups(classes, "make")[1] if cfg.optim.make_loss_weight else None
    teachers = None
    if cfg.optim.distill_from:
        teachers = Distillation.load(cfg.optim.distill_from, classes, cfg.optim.distill_temperature, hw.device)
        if hw.channels_last:  # the batches they see are
            for teacher in teachers.teachers:
                teacher.net.to(memory_format=torch.channels_last)
    return (ClassifyAndLocate if cfg.model.localizes else Objective)(cfg.optim, makes, teachers)


@dataclass
class Loop:
    """What the epochs run: the network that trains (the whole model, or only its head on cached
    trunk features) and the batches it sees. `val_loader` is None in a final fit."""

    net: nn.Module
    frozen: list[nn.Module]  # blocks kept in eval mode while the rest trains
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    channels_last: bool


def make_loop(cfg: Config, model, frozen, splits, images, hw: Hardware, generator) -> Loop:
    if cfg.model.localizes:
        return classify_and_locate(cfg, model, frozen, splits, images, hw, generator)
    if cfg.finetune.unfreeze == 0 and cfg.optim.cache_features and not cfg.optim.distill_from:  # a teacher sees images
        return head_on_cached_features(cfg, model, splits, images, hw, generator)
    train_set = data.CarsDataset(
        splits["train"], presets.train_preset(cfg.augment, cfg.model), cfg.data.crop_to_bbox, images["train"]
    )
    val_set = data.CarsDataset(splits["val"], presets.eval_preset(cfg.model), cfg.data.crop_to_bbox, images["val"])
    return Loop(
        net=model,
        frozen=frozen,
        train_loader=make_loader(train_set, cfg, shuffle=True, generator=generator),
        val_loader=None if is_final_fit(cfg) else make_loader(val_set, cfg, shuffle=False),
        channels_last=hw.channels_last,
    )


def localizing_dataset(cfg: Config, crops, crop_images, training: bool) -> data.LocalizingDataset:
    photos = data.uncropped(crops, cfg.data.data_root)
    return data.LocalizingDataset(
        crops,
        photos,
        data.photo_boxes(photos, cfg.data.data_root),
        classify=presets.train_preset(cfg.augment, cfg.model) if training else presets.eval_preset(cfg.model),
        locate=presets.LocatePresetTrain(
            size=cfg.model.locate_size,
            mean=cfg.model.mean,
            std=cfg.model.std,
            hflip_prob=cfg.augment.hflip_prob if training else 0.0,
        ),
        min_match=cfg.data.min_box_match,
        photo_share=cfg.augment.photo_share,
        locate_crop_share=cfg.augment.locate_crop_share,
        crop_images=crop_images,
        photo_images=data.decode_all(photos, False, cfg.runtime.progress) if cfg.data.cache_images else None,
        crop_to_bbox=cfg.data.crop_to_bbox,
        evaluation=not training,
    )


def classify_and_locate(cfg: Config, model, frozen, splits, images, hw: Hardware, generator) -> Loop:
    """A model with a box head trains on both views of each car: see data.LocalizingDataset."""
    train_set = localizing_dataset(cfg, splits["train"], images["train"], training=True)
    loop = Loop(
        net=model,
        frozen=frozen,
        train_loader=make_loader(train_set, cfg, shuffle=True, generator=generator),
        val_loader=None,
        channels_last=hw.channels_last,
    )
    if not is_final_fit(cfg):
        loop.val_loader = make_loader(
            localizing_dataset(cfg, splits["val"], images["val"], training=False), cfg, shuffle=False
        )
    return loop


def head_on_cached_features(cfg: Config, model, splits, images, hw: Hardware, generator) -> Loop:
    """A frozen trunk gives the same features every epoch (given no augmentation): compute them
    once and train the head on them, at a tiny fraction of the cost."""
    head_path = model_lib.spec(cfg.model.arch).head
    head = model_lib.head_module(model, cfg.model.arch)

    def features(split: str) -> torch.utils.data.TensorDataset:
        dataset = data.CarsDataset(splits[split], presets.eval_preset(cfg.model), cfg.data.crop_to_bbox, images[split])
        return extract_features(model, make_loader(dataset, cfg, shuffle=False), hw, cfg.runtime.progress)

    model.set_submodule(head_path, nn.Identity())
    try:
        train_features = features("train")
        val_features = None if is_final_fit(cfg) else features("val")
    finally:
        model.set_submodule(head_path, head)
    log.info("trunk frozen: trained the head on cached features")
    return Loop(
        net=head,
        frozen=[],
        train_loader=make_loader(train_features, cfg, shuffle=True, generator=generator),
        val_loader=None if val_features is None else make_loader(val_features, cfg, shuffle=False),
        channels_last=False,
    )


@torch.no_grad()
def extract_features(trunk, loader, hw: Hardware, progress: bool) -> torch.utils.data.TensorDataset:
    """Run a frozen trunk once over `loader`."""
    trunk.eval()
    feats, labels = [], []
    for inputs, targets in tqdm(loader, desc="caching trunk features", disable=not progress, leave=False):
        with hw.autocast():
            feats.append(trunk(hw.batch(inputs, hw.channels_last)).float().cpu())
        labels.append(targets)
    return torch.utils.data.TensorDataset(torch.cat(feats), torch.cat(labels))


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=True
        )
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    raise ValueError(f"optimizer must be adam, adamw or sgd; got {optim.optimizer!r}")


def make_scheduler(optim: OptimConfig, optimizer, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """Stepped once per batch: linear warm-up from lr/warmup_steps to lr over `warmup_epochs`, then
    cosine to zero at the end of the run, step decay, or constant."""
    warmup = optim.warmup_epochs * steps_per_epoch
    total = max(1, optim.epochs * steps_per_epoch)
    if optim.lr_schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif optim.lr_schedule == "step":
        # every lr_step_epochs epochs counted from the start of the run, warm-up included
        every = optim.lr_step_epochs * steps_per_epoch
        decays = [max(0, step - warmup) for step in range(every, total + 1, every)]
        main = lr_scheduler.MultiStepLR(optimizer, milestones=decays, gamma=optim.lr_gamma)
    elif optim.lr_schedule == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0)
    else:
        raise ValueError(f"lr_schedule must be cosine, step or constant; got {optim.lr_schedule!r}")
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class WeightAverage:
    """An exponential moving average of a network's weights and batch-norm statistics, updated after
    every step: less of the last batches' noise than the last step's weights (Polyak averaging)."""

    def __init__(self, net: nn.Module, decay: float):
        self.net = net
        self.average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self) -> None:
        self.average.update_parameters(self.net)

    @contextmanager
    def applied(self):
        """The network holds the averaged weights inside the block, its own again after it."""
        own = {name: tensor.clone() for name, tensor in self.net.state_dict().items()}
        self.net.load_state_dict(self.average.module.state_dict())
        try:
            yield
        finally:
            self.net.load_state_dict(own)


@dataclass
class Optimization:
    """What updates the weights: the loss, the optimiser, its per-step LR schedule, fp16 loss scaling,
    and the weights' moving average when the recipe keeps one."""

    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    average: WeightAverage | None = None

    @classmethod
    def create(cls, optim: OptimConfig, loop: Loop, hw: Hardware, objective: Objective) -> Optimization:
        optimizer = make_optimizer(optim, loop.net.parameters())
        return cls(
            objective=objective,
            optimizer=optimizer,
            scheduler=make_scheduler(optim, optimizer, len(loop.train_loader)),
            scaler=torch.amp.GradScaler(hw.device.type) if hw.dtype == torch.float16 else None,
            average=WeightAverage(loop.net, optim.ema_decay) if optim.ema_decay else None,
        )

    def kept_weights(self):
        """A block in which the network holds the weights a run validates and keeps."""
        return self.average.applied() if self.average else nullcontext()

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        if self.average:
            self.average.update()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


# ----------------------------------------------------------------------------- epochs


def run_epoch(
    loop: Loop,
    loader,
    objective: Objective,
    hw: Hardware,
    *,
    optimization: Optimization | None = None,
    desc: str = "",
    progress: bool = True,
) -> tuple[float, float]:
    """One pass over `loader`; trains when `optimization` is given. Returns (mean loss, top-1)."""
    training = optimization is not None
    if training:
        train_mode(loop.net, list(loop.frozen))
    else:
        loop.net.eval()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    with torch.set_grad_enabled(training):
        for inputs, targets in bar:
            loss, logits, targets = objective(loop.net, inputs, targets, hw, loop.channels_last)
            if training:
                optimization.step(loss)
            total_loss += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return total_loss / max(1, seen), correct / max(1, seen)


def train_and_validate(
    epoch: int, cfg: Config, loop: Loop, opt: Optimization, hw: Hardware
) -> tuple[dict, float | None]:
    """Train, then validate (unless a final fit). Returns (the epoch's metrics row, the unrounded val loss)."""
    started = time.perf_counter()
    progress = cfg.runtime.progress
    desc = f"epoch {epoch}/{cfg.optim.epochs}"
    train_loss, train_acc = run_epoch(
        loop, loop.train_loader, opt.objective, hw, optimization=opt, desc=desc, progress=progress
    )
    val_loss = val_acc = None
    last_step = {}
    if loop.val_loader is not None:
        if opt.average:  # the last step's weights too, to see what the average adds
            _, last_step_acc = run_epoch(loop, loop.val_loader, opt.objective, hw, desc="val", progress=progress)
            last_step = {"val_acc_last_step": round(last_step_acc, 5)}
        with opt.kept_weights():
            val_loss, val_acc = run_epoch(loop, loop.val_loader, opt.objective, hw, desc="val", progress=progress)
    row = {
        "epoch": epoch,
        "lr": opt.lr,
        "train_loss": round(train_loss, 5),
        "train_acc": round(train_acc, 5),
        "val_loss": None if val_loss is None else round(val_loss, 5),
        "val_acc": None if val_acc is None else round(val_acc, 5),
        **last_step,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return row, val_loss


@dataclass
class Progress:
    """The epochs run so far and early stopping's state: what a checkpoint holds besides the weights."""

    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    stale: int = 0  # epochs since val loss last improved
    select_on: str = "val_loss"  # the epoch kept: the lowest val loss, or the highest val accuracy ("val_acc")

    @property
    def epoch(self) -> int:
        """The last finished epoch (0 before the first)."""
        return self.history[-1]["epoch"] if self.history else 0

    def add(self, row: dict, val_loss: float | None) -> bool:
        """Record an epoch; True when its weights are the ones to keep (in a final fit, always: the last wins)."""
        self.history.append(row)
        if val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.stale = (math.inf if val_loss is None else val_loss), 0
        else:
            self.stale += 1
        return self.best() is row

    def should_stop(self, patience: int) -> bool:
        return bool(patience) and self.stale >= patience

    def best(self) -> dict:
        if self.history[-1]["val_loss"] is None:  # final fit
            return self.history[-1]
        if self.select_on == "val_acc":
            return max(self.history, key=lambda r: r["val_acc"])
        return min(self.history, key=lambda r: r["val_loss"])


def save_checkpoint(
    path: Path, model, opt: Optimization, progress: Progress, generator: torch.Generator | None = None
) -> None:
    """Everything the next epoch depends on, random state included (`generator`: the loader's shuffle), so
    that a resumed run goes on as the uninterrupted one would have."""
    random_state = {"torch": torch.get_rng_state()} | ({"loader": generator.get_state()} if generator else {})
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "epoch": progress.epoch,
            "history": progress.history,
            "best_val_loss": progress.best_val_loss,
            "stale": progress.stale,
            "random_state": random_state,
        }
        | ({"average": opt.average.average.state_dict()} if opt.average else {}),
        path,
    )


def resume(
    path: str | Path,
    model,
    opt: Optimization,
    device,
    generator: torch.Generator | None = None,
    select_on: str = "val_loss",
) -> Progress:
    """Load a checkpoint into `model`, `opt` and the random state; returns where the run had got to."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    random_state = ckpt.get("random_state", {})  # older checkpoints have none: the shuffle restarts
    if "torch" in random_state:
        torch.set_rng_state(random_state["torch"])
    if generator is not None and "loader" in random_state:
        generator.set_state(random_state["loader"])
    model.load_state_dict(ckpt["model"])
    if opt.average and "average" in ckpt:
        opt.average.average.load_state_dict(ckpt["average"])
    advance_schedule(opt.scheduler, ckpt["scheduler"]["last_epoch"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    for group, lr in zip(opt.optimizer.param_groups, opt.scheduler.get_last_lr(), strict=True):
        group["lr"] = lr  # the schedule's, which may differ from the checkpoint's when --epochs changed
    log.info("resumed from %s at epoch %d", path, ckpt["epoch"] + 1)
    return Progress(ckpt["history"], ckpt["best_val_loss"], ckpt["stale"], select_on)


def advance_schedule(scheduler: lr_scheduler.LRScheduler, steps: int) -> None:
    """Move this run's schedule to the checkpoint's step. The schedule is rebuilt from the config rather
    than loaded from the checkpoint (which only supplies the step): a resumed run may be given more
    --epochs, and a loaded state would keep the old run's cosine length and decay steps."""
    with warnings.catch_warnings():  # no optimizer.step() yet, on purpose: the weights are the checkpoint's
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"), UserWarning)
        for _ in range(steps):
            scheduler.step()


def write_history(history: list[dict], out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(history, indent=1))
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plots.training_curves(history, out / "curves.png")


def log_epoch(row: dict, best: bool) -> None:
    if row["val_loss"] is None:
        val = "no val (train+val fit)"
    else:
        val = f"val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}"
    log.info(
        "epoch %d: train loss %.3f acc %.3f | %s | %.0fs%s",
        row["epoch"],
        row["train_loss"],
        row["train_acc"],
        val,
        row["seconds"],
        " *" if best else "",
    )


def run_epochs(
    cfg: Config, model, loop: Loop, opt: Optimization, hw: Hardware, progress: Progress, out: Path, report, generator
):
    """From where `progress` left off to cfg.optim.epochs, each epoch written down and checkpointed;
    stops early once val loss has not improved for `early_stopping_patience` epochs."""
    if progress.should_stop(cfg.optim.early_stopping_patience):  # resumed after it had stopped early
        return
    for epoch in range(progress.epoch + 1, cfg.optim.epochs + 1):
        row, val_loss = train_and_validate(epoch, cfg, loop, opt, hw)
        keep = progress.add(row, val_loss)
        if keep:
            with opt.kept_weights():
                torch.save(model.state_dict(), out / BEST_WEIGHTS)
        write_history(progress.history, out)
        save_checkpoint(out / CHECKPOINT, model, opt, progress, generator)
        log_epoch(row, best=keep and val_loss is not None)
        report(row)
        if progress.should_stop(cfg.optim.early_stopping_patience):
            log.info("early stop: val loss has not improved for %d epochs", progress.stale)
            break


def summarize(cfg: Config, progress: Progress, train_images: int, init: str, hw: Hardware) -> dict:
    best = progress.best()
    return {
        "fit_on": cfg.data.fit_on,
        "train_images": train_images,
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_acc": best["val_acc"],
        "epochs_run": len(progress.history),
        "init": init,
        "device": str(hw.device),
        "amp": str(hw.dtype),
        "train_seconds": round(sum(r["seconds"] for r in progress.history), 1),
    }


# ----------------------------------------------------------------------------- fit


def fit(cfg: Config, report=None) -> dict:
    """Train per `cfg`, tracked in MLflow. `report(metrics_row)` is called after every epoch (Ray Tune uses it)."""
    out = Path(cfg.runtime.output_dir)
    checkpoint = checkpoint_to_resume(cfg, out)
    if checkpoint is None:  # a new training in an old folder is a new MLflow run; a resumed one continues its run
        (out / tracking.RUN_FILE).unlink(missing_ok=True)
    with tracking.tracked(out, cfg.tracking.track, cfg.tracking.experiment, name=out.name) as tracker:
        if checkpoint is None:  # a resumed run's params are logged already (its runtime settings may differ)
            tracker.params(cfg.to_flat_dict())
        tracker.tags({"stage": "train", "arch": cfg.model.arch, "fit_on": cfg.data.fit_on})

        def after_epoch(row: dict) -> None:
            tracker.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            if report is not None:
                report(row)

        summary = train(cfg, out, after_epoch, checkpoint)
        tracker.metrics(summary)
        tracker.artifacts(*(out / name for name in RUN_ARTIFACTS))
    return summary


def train(cfg: Config, out: Path, report=lambda row: None, checkpoint: Path | None = None) -> dict:
    """Train per `cfg` into `out` (from `checkpoint` when given), calling `report(row)` after every
    epoch; returns the run's summary."""
    out.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(cfg.runtime.seed)
    hw = Hardware.resolve(cfg.runtime)
    index, splits, images = prepare_data(cfg)
    write_run_record(cfg, index, splits, out)
    model, frozen, init = setup_model(cfg, len(index.classes), hw)
    loop = make_loop(cfg, model, frozen, splits, images, hw, generator)
    opt = Optimization.create(cfg.optim, loop, hw, make_objective(cfg, index.classes, hw))
    select_on = cfg.optim.select_on
    progress = (
        resume(checkpoint, model, opt, hw.device, generator, select_on) if checkpoint else Progress(select_on=select_on)
    )
    run_epochs(cfg, model, loop, opt, hw, progress, out, report, generator)
    summary = summarize(cfg, progress, len(splits["train"]), init, hw)
    summary_file, text = out / "train_summary.json", json.dumps(summary, indent=1)
    if not (summary_file.is_file() and summary_file.read_text() == text):  # make train: a finished run stays done
        summary_file.write_text(text)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = config_lib.from_args(args)
        summary = fit(cfg)
    except (
        data.DatasetError,
        config_lib.ConfigError,
        model_lib.PretrainedWeightsError,
        tracking.TrackingError,
        ValueError,
    ) as err:
        return exit_with(err)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
