from __future__ import annotations

import argparse

import pytest

from training import config as config_lib


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("arch: resnet50\nepochs: 3\nlr: 0.01\nmean: [0.5, 0.5, 0.5]\n")
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser)
    cfg = config_lib.from_args(parser.parse_args(["--config", str(path), "--epochs", "7", "--resume", "none"]))
    assert (cfg.arch, cfg.epochs, cfg.lr, cfg.mean, cfg.resume) == ("resnet50", 7, 0.01, (0.5, 0.5, 0.5), None)
    assert cfg.model_name == "resnet50_cars"


def test_saved_config_round_trips(tmp_path):
    cfg = config_lib.load(overrides={"arch": "mobilenet_v2", "channels_last": "false"})
    cfg.save(tmp_path / "c.yaml")
    assert config_lib.load(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochz": 3}, "unknown config keys: epochz"),
        ({"epochs": "many"}, "epochs: expected int"),
        ({"cache_images": "maybe"}, "cache_images: expected true/false"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(overrides=overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config file not found"):
        config_lib.load(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    for name in ("efficientnet_lite0", "resnet50"):
        cfg = config_lib.load(f"configs/{name}.yaml")
        assert cfg.arch == name
