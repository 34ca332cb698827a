"""The one place where training knobs live.

Every stage reads a `Config`: defaults here, then an optional YAML file (`--config`), then
`--field value` flags on the command line, in that order of precedence.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Config:
    # --- data ---
    data_root: str = "../shared/stanford_cars"
    layout: str = "auto"  # auto | folder | devkit
    crop_to_bbox: bool = True  # devkit layout only: crop each photo to its annotated box
    val_fraction: float = 0.10
    test_fraction: float = 0.15  # taken from the train images when the dataset has no test split
    split_seed: int = 0
    # train: fit on train, pick the epoch with the best val loss, stop early on it.
    # train+val: the final fit -- val joins the training data, runs `epochs` epochs (the count a
    # `train` run found on val) and keeps the last one. Test stays held out either way.
    fit_on: str = "train"
    max_images_per_class: int | None = None  # smoke runs: cap images per class
    cache_images: bool = True  # decode every image once up front (also validates them all)

    # --- model ---
    arch: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # imagenet | none | path to a local weights file
    unfreeze: int = -1  # train only the last N blocks (+ classifier); -1 = everything
    dropout: float = 0.2

    # --- preprocessing (see presets.py) ---
    train_size: int = 224
    eval_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    auto_augment: str = "none"  # none | ta_wide | autoaugment | randaugment
    hflip_prob: float = 0.5
    min_crop_scale: float = 0.35

    # --- optimisation ---
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # cosine | step | constant
    lr_step_epochs: int = 7
    lr_gamma: float = 0.1
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    early_stopping_patience: int = 5  # epochs without a better val loss; 0 disables
    cache_features: bool = True  # with unfreeze=0, run the frozen trunk once and train the head on its outputs

    # --- runtime ---
    device: str = "auto"  # auto | cpu | cuda | mps
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    num_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str | None = None  # checkpoint.pt of an interrupted run
    progress: bool = True

    # --- evaluate / export ---
    top_k: int = 5
    export_dir: str | None = None  # default: exports/<arch>_cars

    # --- tune (Ray Tune) ---
    tune_samples: int = 6
    tune_epochs: int = 15
    tune_address: str | None = None  # an existing Ray cluster, e.g. ray://head:10001
    tune_cpus_per_trial: float = 2.0
    tune_gpus_per_trial: float = 0.0

    # --- experiment tracking (training/tracking.py) ---
    # MLflow: the project's local store (mlruns/) unless MLFLOW_TRACKING_URI names another.
    track: bool = True
    experiment: str = "stanford-cars"

    extra: dict = field(default_factory=dict)  # free-form notes carried into the export

    @property
    def model_name(self) -> str:
        """The served name follows the architecture: never one arch under another's name."""
        return f"{self.arch}_cars"

    def resolved_export_dir(self) -> Path:
        return Path(self.export_dir or Path("exports") / self.model_name)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    pass


# Fields with a fixed set of values: a typo fails when the config is read, not after the data
# has been decoded. (`arch` is checked against training.model's registry the same way.)
CHOICES = {
    "layout": ("auto", "folder", "devkit"),
    "fit_on": ("train", "train+val"),
    "auto_augment": ("none", "ta_wide", "autoaugment", "randaugment"),
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "amp": ("auto", "bf16", "fp16", "off"),
}


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(name: str, value, hint):
    """Turn a YAML/CLI value into the field's type, with a message that names the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(name, value, args[0])
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(float(v) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint is dict:
        return dict(value)
    try:
        return hint(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from err


def from_dict(values: dict, base: Config | None = None) -> Config:
    types_ = _field_types()
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    cfg = dataclasses.replace(base or Config())
    for key, value in values.items():
        value = _coerce(key, value, types_[key])
        if key in CHOICES and value not in CHOICES[key] and not (key == "device" and value.startswith("cuda:")):
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}; got {value!r}")
        setattr(cfg, key, value)
    return cfg


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = from_dict(yaml.safe_load(path.read_text()) or {}, cfg)
    return from_dict(overrides or {}, cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` plus one `--<field>` flag per Config field (default: leave as configured)."""
    parser.add_argument("--config", help="YAML file with Config fields (see configs/)")
    group = parser.add_argument_group("config overrides (any Config field)")
    for name in _field_types():
        if name == "extra":
            continue
        group.add_argument(f"--{name}", dest=f"cfg_{name}", default=None, metavar="VALUE")


def from_args(args: argparse.Namespace) -> Config:
    overrides = {
        key.removeprefix("cfg_"): value
        for key, value in vars(args).items()
        if key.startswith("cfg_") and value is not None
    }
    return load(args.config, overrides)
