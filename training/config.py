"""The one place where training knobs live.

Every stage reads a `Config`: defaults here, then an optional YAML file (`--config`), then
`--field value` flags on the command line, in that order of precedence.

A `Config` is made of sections: `data`, `model`, `finetune`, `augment`, `optim`, `runtime`,
`tune`, `tracking` (plus `export_dir` and `extra`). `model` is carmodel's `ModelConfig`: the
part that ships with an export as model.yaml; the rest stays with training.

Every setting also has a flat name, unique across the sections: its command-line flag (`--lr`),
its MLflow param, and its key in a flat YAML file. Mostly the flat name is the field's own name;
the `tune` and `tracking` sections keep the flat names they had before there were sections
(`tune_samples` is `tune.samples`, `track` is `tracking.enabled`). YAML may be written either
way, or mixed: `save` writes sections, and the flat config.yaml of older runs and exports loads.

Configs and their sections are frozen; `from_dict(values, base)` makes a changed copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from carmodel import models as model_lib
from carmodel.config import ModelConfig

FLAT_NAME = "flat_name"  # dataclass field metadata: the setting's flat name, when not the field's own


def _flat(name: str, default) -> dataclasses.Field:
    return field(default=default, metadata={FLAT_NAME: name})


@dataclass(frozen=True)
class DataConfig:
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
    auto_augment: str = "none"  # none | ta_wide | autoaugment | randaugment
    hflip_prob: float = 0.5
    min_crop_scale: float = 0.35
    # resolution augmentation: this share of training images is first shrunk so that its longer
    # side is downscale_min..downscale_max px (then scaled back up by the crop), like thumbnails
    downscale_prob: float = 0.0
    downscale_min: int = 48
    downscale_max: int = 160
    # with a box head: the share of classification inputs cut from the whole photo at its box
    # (jittered) rather than taken from the crop, and of box inputs that are crops (box = all of it)
    photo_share: float = 0.5
    locate_crop_share: float = 0.3


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"  # cosine | step | constant, after `warmup_epochs` of linear warm-up
    lr_step_epochs: int = 7
    lr_gamma: float = 0.1
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    early_stopping_patience: int = 5  # epochs without a better val loss; 0 disables
    cache_features: bool = True  # with unfreeze=0, run the frozen trunk once and train the head on its outputs
    # with a box head: loss = CE(car) + box_loss_weight * smooth-L1(box) + whole_image_loss_weight * CE(whole image)
    box_loss_weight: float = 5.0
    whole_image_loss_weight: float = 0.5


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    num_workers: int = 0
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str | None = None  # checkpoint.pt of an interrupted run
    progress: bool = True


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune (training/tune.py). Flags and flat keys: --tune_samples, --tune_epochs, ..."""

    samples: int = _flat("tune_samples", 6)
    epochs: int = _flat("tune_epochs", 15)
    address: str | None = _flat("tune_address", None)  # an existing Ray cluster, e.g. ray://head:10001
    cpus_per_trial: float = _flat("tune_cpus_per_trial", 2.0)
    gpus_per_trial: float = _flat("tune_gpus_per_trial", 0.0)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (training/tracking.py). MLflow: the project's local store (mlruns/)
    unless MLFLOW_TRACKING_URI names another."""

    enabled: bool = _flat("track", True)
    experiment: str = "stanford-cars"


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
        """The sectioned form, as `save` writes it: {"data": {...}, "model": {...}, ..., "extra": {...}}."""
        return _plain(dataclasses.asdict(self))

    def to_flat_dict(self) -> dict:
        """{flat name: value}: the flags' names, and the params MLflow records for a run."""
        return {
            name: _plain(getattr(getattr(self, s.section), s.name) if s.section else getattr(self, s.name))
            for name, s in FIELDS.items()
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    """Where a flat name lives: `section` (None for a top-level field such as export_dir) and field `name`."""

    section: str | None
    name: str
    hint: object


def _settings() -> tuple[dict[str, type], dict[str, Setting]]:
    sections, settings = {}, {}
    top_hints = typing.get_type_hints(Config)
    for top in dataclasses.fields(Config):
        hint = top_hints[top.name]
        if not dataclasses.is_dataclass(hint):
            settings[top.name] = Setting(None, top.name, hint)
            continue
        sections[top.name] = hint
        hints = typing.get_type_hints(hint)
        for f in dataclasses.fields(hint):
            flat = f.metadata.get(FLAT_NAME, f.name)
            if flat in settings or flat in sections:
                raise TypeError(f"flat config name {flat!r} is not unique")
            settings[flat] = Setting(top.name, f.name, hints[f.name])
    return sections, settings


SECTIONS, FIELDS = _settings()

# Keys that older flat config.yaml files hold and that no longer mean anything: skipped on load.
RETIRED = {"top_k"}

# Fields with a fixed set of values: a typo fails when the config is read, not after the data
# has been decoded. (`arch` is checked against carmodel.models' registry the same way.)
CHOICES = {
    "layout": ("auto", "folder", "devkit"),
    "fit_on": ("train", "train+val"),
    "auto_augment": ("none", "ta_wide", "autoaugment", "randaugment"),
    "optimizer": ("adam", "adamw", "sgd"),
    "lr_schedule": ("cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "amp": ("auto", "bf16", "fp16", "off"),
}


def _plain(value):
    """YAML- and MLflow-friendly: tuples become lists, all the way down."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


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
        if len(items) != len(typing.get_args(hint)):
            raise ConfigError(f"{name}: expected {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(_coerce(name, v, float) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    try:
        return hint(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from err


def _check_choice(name: str, value) -> None:
    if name == "arch":
        try:
            model_lib.spec(value)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif name in CHOICES and value not in CHOICES[name] and not (name == "device" and value.startswith("cuda:")):
        raise ConfigError(f"{name} must be one of {', '.join(CHOICES[name])}; got {value!r}")


def _flat_items(values: dict) -> dict:
    """{flat name: raw value} from flat keys, sections, or both."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping of settings, got {values!r}")
    by_section = {name: {s.name: flat for flat, s in FIELDS.items() if s.section == name} for name in SECTIONS}
    flat_values, unknown, hints = {}, [], []

    def put(flat: str, value) -> None:
        if flat in flat_values:
            raise ConfigError(f"{flat} is given twice (as a flat key and in its section)")
        flat_values[flat] = value

    for key, value in values.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: a section, expected a mapping of its settings, got {value!r}")
            for name, item in value.items():
                if name in by_section[key]:
                    put(by_section[key][name], item)
                else:
                    unknown.append(f"{key}.{name}")
                    hints.append(f"{key}'s keys are {', '.join(by_section[key])}")
        elif key in FIELDS:
            put(key, value)
        elif key not in RETIRED:
            unknown.append(str(key))
            if isinstance(value, dict):
                hints.append(f"the sections are {', '.join(SECTIONS)}")
    if unknown:
        raise ConfigError(
            f"unknown config keys: {', '.join(unknown)}" + (f" ({'; '.join(dict.fromkeys(hints))})" if hints else "")
        )
    return flat_values


def from_dict(values: dict, base: Config | None = None) -> Config:
    """`base` (default: the defaults) with `values` set: flat keys ({"lr": 0.01}), sections
    ({"optim": {"lr": 0.01}}), or both. Values are coerced to the field's type and checked."""
    changes: dict[str | None, dict] = {}
    for flat, raw in _flat_items(values).items():
        setting = FIELDS[flat]
        value = _coerce(flat, raw, setting.hint)
        _check_choice(flat, value)
        changes.setdefault(setting.section, {})[setting.name] = value
    cfg = base or Config()
    top = changes.pop(None, {})
    sections = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in changes.items()}
    return dataclasses.replace(cfg, **sections, **top)


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the YAML file at `path` (flat or sectioned), then `overrides`."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = from_dict(yaml.safe_load(path.read_text()) or {}, cfg)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return from_dict(overrides or {}, cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` plus one `--<flat name>` flag per setting (default: leave as configured)."""
    parser.add_argument("--config", help="YAML file with Config settings, flat or in sections (see configs/)")
    groups = {}
    for flat, setting in FIELDS.items():
        if flat == "extra":
            continue
        title = f"config overrides: {setting.section or 'export'}"
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        group.add_argument(f"--{flat}", dest=f"cfg_{flat}", default=None, metavar="VALUE")


def from_args(args: argparse.Namespace) -> Config:
    overrides = {
        key.removeprefix("cfg_"): value
        for key, value in vars(args).items()
        if key.startswith("cfg_") and value is not None
    }
    return load(args.config, overrides)
