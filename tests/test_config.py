from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from carmodel.config import ModelConfig
from training import config as config_lib

# the flat config.yaml of the export shipped before there were sections (issue 11) and a box head (issue 12)
FLAT_EXPORT_CONFIG = str(Path(__file__).parent / "data" / "flat_export_config.yaml")


def parse(*argv: str) -> config_lib.Config:
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    return config_lib.from_args(parser.parse_args(list(argv)))


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("arch: resnet50\nepochs: 3\nlr: 0.01\nmean: [0.5, 0.5, 0.5]\n")
    cfg = parse("--config", str(path), "--epochs", "7", "--resume", "none")
    assert (cfg.model.arch, cfg.optim.epochs, cfg.optim.lr, cfg.model.mean, cfg.runtime.resume) == (
        "resnet50",
        7,
        0.01,
        (0.5, 0.5, 0.5),
        None,
    )
    assert cfg.model.model_name == "resnet50_cars"


def test_sectioned_yaml_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {arch: resnet50, eval_size: 256}\noptim: {lr: 0.01, epochs: 3}\n"
        "tune: {samples: 4, address: ray://head:10001}\ntracking: {enabled: false}\nexport_dir: out/x\n"
    )
    cfg = config_lib.load(path)
    assert cfg.model == ModelConfig(arch="resnet50", eval_size=256)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (0.01, 3, 32)  # untouched keys keep defaults
    assert (cfg.tune.samples, cfg.tune.address, cfg.tracking.enabled) == (4, "ray://head:10001", False)
    assert cfg.export_dir == "out/x"


def test_flat_cli_flag_overrides_a_sectioned_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.01}\nmodel: {arch: resnet50}\ntune: {samples: 4}\n")
    cfg = parse("--config", str(path), "--lr", "0.5", "--arch", "mobilenet_v2", "--tune_samples", "2", "--track", "no")
    assert (cfg.optim.lr, cfg.model.arch, cfg.tune.samples, cfg.tracking.enabled) == (0.5, "mobilenet_v2", 2, False)


def test_flat_config_of_an_existing_export_still_loads():
    """Exports and runs on disk have flat config.yaml files (with the since-removed top_k)."""
    flat = yaml.safe_load(Path(FLAT_EXPORT_CONFIG).read_text())
    assert "data_root" in flat and "top_k" in flat  # really the flat form
    cfg = config_lib.load(FLAT_EXPORT_CONFIG)
    assert cfg.model == ModelConfig(arch="efficientnet_lite0", dropout=0.2, eval_size=224)
    assert (cfg.data.fit_on, cfg.finetune.unfreeze, cfg.augment.train_size, cfg.optim.epochs) == (
        "train+val",
        5,
        192,
        20,
    )
    assert cfg.runtime.output_dir == "runs/efficientnet_lite0_final" and cfg.tune.samples == 6
    # every setting it has is read back under its own name (it predates track/experiment: defaults)
    assert {k: v for k, v in flat.items() if k != "top_k"}.items() <= cfg.to_flat_dict().items()


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.load(overrides={"arch": "mobilenet_v2", "channels_last": "false", "tune_address": "ray://h:1"})
    cfg = config_lib.from_dict({"extra": {"note": "x"}, "optim": {"lr": 0.02}}, cfg)
    cfg.save(tmp_path / "c.yaml")
    saved = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert list(saved) == [
        "data",
        "model",
        "finetune",
        "augment",
        "optim",
        "runtime",
        "export_dir",
        "tune",
        "tracking",
        "extra",
    ]
    assert saved["optim"]["lr"] == 0.02 and saved["tune"]["address"] == "ray://h:1"
    assert config_lib.load(tmp_path / "c.yaml") == cfg


def test_flat_names_are_the_flags_and_the_mlflow_params():
    flat = config_lib.Config().to_flat_dict()
    assert {"lr", "arch", "data_root", "tune_samples", "tune_gpus_per_trial", "track", "export_dir"} <= set(flat)
    assert "top_k" not in flat and "samples" not in flat
    assert flat["mean"] == [0.485, 0.456, 0.406]  # plain lists, as YAML and MLflow want them


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochz": 3}, "unknown config keys: epochz"),
        ({"optim": {"lrr": 0.1}}, r"unknown config keys: optim.lrr \(optim's keys are epochs, batch_size, .*lr,"),
        ({"optimiser": {"lr": 0.1}}, r"unknown config keys: optimiser \(the sections are data, model, "),
        ({"tune": {"tune_samples": 2}}, "unknown config keys: tune.tune_samples"),
        ({"optim": 3}, "optim: a section, expected a mapping"),
        ({"lr": 0.1, "optim": {"lr": 0.2}}, "lr is given twice"),
        ({"epochs": "many"}, "epochs: expected int"),
        ({"cache_images": "maybe"}, "cache_images: expected true/false"),
        ({"mean": [0.5, 0.5]}, "mean: expected 3 numbers"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of adam, adamw, sgd; got 'lbfgs'"),
        ({"optim": {"lr_schedule": "linear"}}, "lr_schedule must be one of cosine, step, constant"),
        ({"arch": "vgg11"}, "unknown arch 'vgg11'"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(overrides=overrides)


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(config_lib.ConfigError, match=r"c\.yaml: unknown config keys: optim\.lrr"):
        config_lib.load(path)


def test_cuda_device_index_is_allowed():
    assert config_lib.load(overrides={"device": "cuda:1"}).runtime.device == "cuda:1"


def test_missing_config_file(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config file not found"):
        config_lib.load(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for name in ("efficientnet_lite0", "resnet50"):
        cfg = config_lib.load(f"configs/{name}.yaml")
        assert cfg.model.arch == name
        assert set(yaml.safe_load(Path(f"configs/{name}.yaml").read_text())) <= set(config_lib.SECTIONS)  # sectioned
    resnet = config_lib.load("configs/resnet50.yaml")
    assert (resnet.finetune.unfreeze, resnet.optim.lr_schedule, resnet.tune.gpus_per_trial) == (2, "step", 1.0)
    # stage 2 of the shipped model starts where stage 1 writes its weights
    stage1, stage2 = (
        config_lib.load("configs/efficientnet_lite0.yaml"),
        config_lib.load("configs/efficientnet_lite0_photos.yaml"),
    )
    assert stage2.finetune.pretrained == f"{stage1.runtime.output_dir}/best.pth"
    assert stage2.model.localizes and not stage1.model.localizes
    assert (stage2.data.split_seed, stage2.data.test_fraction) == (stage1.data.split_seed, stage1.data.test_fraction)
