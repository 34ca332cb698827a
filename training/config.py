"""The one place where training knobs live.

Every stage reads a `Config`: defaults here, then an optional YAML file (`--config`), then `--<setting>`
flags on the command line, in that order of precedence. A Config is made of sections - data, model,
finetune, augment, optim, runtime, tune, tracking - and export_dir and extra; its YAML has the same
sections:

    optim:
      lr: 0.0005
      epochs: 6

A setting's flag is its own name (`--lr 0.01`), unique across the sections, and so is its MLflow param
(carmodel/typed.py). `model` is carmodel's ModelConfig: the part that ships with an export as model.yaml;
the rest stays with training. Configs are frozen; `override(cfg, lr=0.01)` makes a changed copy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from carmodel import models as model_lib
from carmodel import typed
from carmodel.config import ModelConfig
from carmodel.typed import SettingsError as ConfigError
from carmodel.typed import setting


@dataclass(frozen=True)
class DataConfig:
    data_root: str = "../shared/stanford_cars"
    layout: str = setting("auto", choices=("auto", "folder", "devkit"))
    crop_to_bbox: bool = True  # devkit layout only: crop each photo to its annotated box
    val_fraction: float = 0.10
    test_fraction: float = 0.15  # taken from the train images when the dataset has no test split
    split_seed: int = 0
    # train: fit on train, pick the epoch with the best val loss, stop early on it.
    # train+val: the final fit -- val joins the training data, runs `epochs` epochs (the count a
    # `train` run found on val) and keeps the last one. Test stays held out either way.
    fit_on: str = setting("train", choices=("train", "train+val"))
    max_images_per_class: int | None = None  # smoke runs: cap images per class
    # A model with a box head (model.locate_size > 0) also trains on <data_root>/photos/ and its
    # boxes.csv; a box matched below this (boxes.csv's `match`) is not trusted to train the box head.
    min_box_match: float = 0.8
    cache_images: bool = True  # decode every image once up front (also validates them all)


@dataclass(frozen=True)
class FinetuneConfig:
    """Where the weights start and how much of the network trains."""

    pretrained: str = "imagenet"  # imagenet | none | path to a local weights file
    unfreeze: int = -1  # train only the last N blocks (+ classifier); -1 = everything


@dataclass(frozen=True)
class AugmentConfig:
    """The training transform (carmodel/presets.py); evaluation's size, mean and std are the model's."""

    train_size: int = 224
    auto_augment: str = setting("none", choices=("none", "ta_wide", "autoaugment", "randaugment"))
    hflip_prob: float = 0.5
    min_crop_scale: float = 0.35
    # resolution augmentation: this share of training images is first shrunk so that its longer
    # side is downscale_min..downscale_max px (then scaled back up by the crop), like thumbnails
    downscale_prob: float = 0.0
    downscale_min: int = 48
    downscale_max: int = 160
    # this share of training images is put through one photo condition (presets.photo_conditions: dusk,
    # blur, grain, JPEG, washed-out colour) at a random strength, so that "sure" keeps meaning right there
    photo_conditions_prob: float = 0.0
    # with a box head: the share of classification inputs cut from the whole photo at its box
    # (jittered) rather than taken from the crop, and of box inputs that are crops (box = all of it)
    photo_share: float = 0.5
    locate_crop_share: float = 0.3


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = setting("adamw", choices=("adam", "adamw", "sgd"))
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    # cosine | step | constant, after `warmup_epochs` of linear warm-up
    lr_schedule: str = setting("cosine", choices=("cosine", "step", "constant"))
    lr_step_epochs: int = 7
    lr_gamma: float = 0.1
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    early_stopping_patience: int = 5  # epochs without a better val loss; 0 disables
    # the epoch kept (best.pth): the lowest val loss, or the highest val accuracy (a teacher, whose answers'
    # accuracy is what it passes on while its loss rises with its confidence); early stopping watches val loss
    select_on: str = setting("val_loss", choices=("val_loss", "val_acc"))
    cache_features: bool = True  # with unfreeze=0, run the frozen trunk once and train the head on its outputs
    # with a box head: loss = CE(car) + box_loss_weight * smooth-L1(box) + whole_image_loss_weight * CE(whole image)
    box_loss_weight: float = 5.0
    whole_image_loss_weight: float = 0.5
    # + make_loss_weight * -log(the probability summed over the true make's classes): the answer's make
    make_loss_weight: float = 0.0
    # > 0: an exponential moving average of the weights, updated every step with this decay, is what
    # validates and what is kept (best.pth); 0 keeps the last step's weights
    ema_decay: float = 0.0
    # finished classifier runs (training/distill.py): the student also learns their averaged answers,
    # loss = (1 - distill_weight) * the labels' loss + distill_weight * the teachers' term (training only)
    distill_from: tuple[str, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 2.0


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = setting("auto", choices=("auto", "bf16", "fp16", "off"))
    channels_last: bool = True
    num_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    # checkpoint.pt of an interrupted run, or "auto": output_dir's, when it is a run of this same config
    resume: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune (training/tune.py)."""

    trials: int = 6
    trial_epochs: int = 15
    ray_address: str | None = None  # an existing Ray cluster, e.g. ray://head:10001
    cpus_per_trial: float = 2.0
    gpus_per_trial: float = 0.0


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (training/tracking.py). MLflow: the project's local store (mlruns/)
    unless MLFLOW_TRACKING_URI names another."""

    track: bool = True
    experiment: str = "stanford-cars"


DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # what ships with the export (model.yaml)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export_dir: str | None = None  # default: exports/<arch>_cars
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    extra: dict = field(default_factory=dict)  # free-form notes carried into the export

    def resolved_export_dir(self) -> Path:
        return Path(self.export_dir or Path("exports") / self.model.model_name)

    def to_dict(self) -> dict:
        """The sectioned form, as `save` writes it."""
        return typed.to_dict(self)

    def to_flat_dict(self) -> dict:
        """{setting: value}: the flags' names, and the params MLflow records for a run."""
        plain = self.to_dict()
        flat = {}
        for name, (path, _, _) in typed.leaves(Config).items():
            node = plain
            for section in path:
                node = node[section]
            flat[name] = node[name]
        return flat

    def save(self, path: str | Path) -> None:
        typed.save_yaml(self, path)


def checked(cfg: Config) -> Config:
    """What a field's type cannot say: the architecture is a known one, the device one there can be."""
    try:
        model_lib.spec(cfg.model.arch)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    device = cfg.runtime.device
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N; got {device!r}")
    return cfg


def from_dict(values: dict, base: Config | None = None) -> Config:
    """`base` (default: the defaults) with `values` set, in sections: {"optim": {"lr": 0.01}}."""
    return checked(typed.from_dict(Config, values, base))


def override(cfg: Config, **settings) -> Config:
    """`cfg` with settings changed by name (their flags' names): override(cfg, lr=0.01, car_head=True)."""
    return checked(typed.from_dict(Config, typed.nest(Config, settings), cfg))


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides` ({setting: value}, as the flags give them)."""
    cfg = checked(typed.load_yaml(Config, path)) if path else Config()
    return override(cfg, **(overrides or {}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` plus one `--<setting>` flag per setting (default: leave as configured)."""
    parser.add_argument("--config", help="YAML file of Config settings, in sections (see training/configs/)")
    typed.add_arguments(parser, Config, skip=("extra",))


def from_args(args: argparse.Namespace) -> Config:
    return load(args.config, typed.flags_given(args, Config))
