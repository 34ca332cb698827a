from __future__ import annotations

import argparse

import pytest
import yaml

from carmodel.config import ModelConfig
from training import config as config_lib


def parse(*argv: str) -> config_lib.Config:
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    return config_lib.from_args(parser.parse_args(list(argv)))


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {arch: resnet50, mean: [0.5, 0.5, 0.5]}\noptim: {epochs: 3, lr: 0.01}\n")
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
        "tune: {trials: 4, ray_address: ray://head:10001}\ntracking: {track: false}\nexport_dir: out/x\n"
    )
    cfg = config_lib.load(path)
    assert cfg.model == ModelConfig(arch="resnet50", eval_size=256)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (0.01, 3, 32)  # untouched keys keep defaults
    assert (cfg.tune.trials, cfg.tune.ray_address, cfg.tracking.track) == (4, "ray://head:10001", False)
    assert cfg.export_dir == "out/x"


def test_a_flag_overrides_a_sectioned_yaml_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.01}\nmodel: {arch: resnet50}\ntune: {trials: 4}\n")
    cfg = parse("--config", str(path), "--lr", "0.5", "--arch", "mobilenet_v2", "--trials", "2", "--track", "no")
    assert (cfg.optim.lr, cfg.model.arch, cfg.tune.trials, cfg.tracking.track) == (0.5, "mobilenet_v2", 2, False)


def test_a_flat_yaml_is_refused_with_the_sections_named(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("arch: resnet50\nlr: 0.01\n")
    with pytest.raises(config_lib.ConfigError, match=r"unknown settings: arch, lr \(known: data, model, finetune"):
        config_lib.load(path)


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.load(overrides={"arch": "mobilenet_v2", "channels_last": "false", "ray_address": "ray://h:1"})
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
    assert saved["optim"]["lr"] == 0.02 and saved["tune"]["ray_address"] == "ray://h:1"
    assert config_lib.load(tmp_path / "c.yaml") == cfg


def test_a_list_setting_takes_any_number_of_values_from_the_cli_and_yaml(tmp_path):
    assert config_lib.load(overrides={"distill_from": "runs/a,runs/b"}).optim.distill_from == ("runs/a", "runs/b")
    assert config_lib.load(overrides={"distill_from": ""}).optim.distill_from == ()
    (tmp_path / "c.yaml").write_text("optim:\n  distill_from: [runs/a]\n")
    assert config_lib.load(tmp_path / "c.yaml").optim.distill_from == ("runs/a",)


def test_setting_names_are_the_flags_and_the_mlflow_params():
    flat = config_lib.Config().to_flat_dict()
    assert {"lr", "arch", "data_root", "trials", "gpus_per_trial", "track", "export_dir"} <= set(flat)
    assert len(flat) == len(set(flat))
    assert flat["mean"] == [0.485, 0.456, 0.406]  # plain lists, as YAML and MLflow want them


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochz": 3}, "unknown settings: epochz"),
        ({"optim": {"lrr": 0.1}}, r"unknown optim settings: lrr \(known: epochs, batch_size, .*lr,"),
        ({"optimiser": {"lr": 0.1}}, r"unknown settings: optimiser \(known: data, model, "),
        ({"optim": 3}, "optim: expected a mapping of settings"),
        ({"optim": {"epochs": "many"}}, "optim.epochs: expected int"),
        ({"data": {"cache_images": "maybe"}}, "data.cache_images: expected true or false"),
        ({"model": {"mean": [0.5, 0.5]}}, "model.mean: expected 3 values"),
        ({"optim": {"optimizer": "lbfgs"}}, "optim.optimizer must be one of adam, adamw, sgd; got 'lbfgs'"),
        ({"optim": {"lr_schedule": "linear"}}, "lr_schedule must be one of cosine, step, constant"),
        ({"model": {"arch": "vgg11"}}, "unknown arch 'vgg11'"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.from_dict(overrides)


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(config_lib.ConfigError, match=r"c\.yaml: unknown optim settings: lrr"):
        config_lib.load(path)


def test_cuda_device_index_is_allowed():
    assert config_lib.load(overrides={"device": "cuda:1"}).runtime.device == "cuda:1"


def test_missing_config_file(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="settings file not found"):
        config_lib.load(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for name in ("efficientnet_lite0", "resnet50"):
        cfg = config_lib.load(f"training/configs/{name}.yaml")
        assert cfg.model.arch == name
    resnet = config_lib.load("training/configs/resnet50.yaml")
    assert (resnet.finetune.unfreeze, resnet.optim.lr_schedule, resnet.tune.gpus_per_trial) == (2, "step", 1.0)
    # stage 2 of the shipped model starts where stage 1 writes its weights
    stage1, stage2 = (
        config_lib.load("training/configs/efficientnet_lite0.yaml"),
        config_lib.load("training/configs/efficientnet_lite0_photos.yaml"),
    )
    assert stage2.finetune.pretrained == f"{stage1.runtime.output_dir}/best.pth"
    assert stage2.model.localizes and not stage1.model.localizes
    assert (stage2.data.split_seed, stage2.data.test_fraction) == (stage1.data.split_seed, stage1.data.test_fraction)
