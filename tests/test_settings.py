"""serving/settings.py: one declaration of the served model's settings, read by the handler and
written by the archive builder, whose flags come from the same fields."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest
import yaml

from carmodel import typed
from handler.settings import HandlerSettings, WorkerSettings
from serving.archive import model_config


def settings(parser: argparse.ArgumentParser, *argv: str):
    args = parser.parse_args(list(argv))
    return tuple(typed.from_dict(cls, typed.flags_given(args, cls)) for cls in (WorkerSettings, HandlerSettings))


def test_every_field_is_a_build_mar_flag_with_its_default():
    parser = argparse.ArgumentParser()
    typed.add_arguments(parser, WorkerSettings)
    typed.add_arguments(parser, HandlerSettings)
    assert settings(parser) == (WorkerSettings(), HandlerSettings())
    workers, handler = settings(parser, "--max_topk", "10", "--ig_steps", "4", "--min_side", "32", "--batch_size", "2")
    assert (handler.max_topk, handler.ig_steps, handler.min_side, workers.batch_size) == (10, 4, 32, 2)
    assert handler.image_limits.min_side == 32
    with pytest.raises(typed.SettingsError, match="backend must be one of auto, openvino, torch"):
        settings(parser, "--backend", "tensorrt")  # choices come from carmodel.runners


def test_the_archive_writes_what_the_handler_reads():
    handler = HandlerSettings(topk=3, max_topk=20, precision="bf16", threads=1)
    written = yaml.safe_load(yaml.safe_dump(model_config(WorkerSettings(batch_size=4), handler)))
    assert written["batchSize"] == 4 and written["minWorkers"] == written["maxWorkers"] == 1
    assert HandlerSettings.from_section(written["handler"]) == handler
    assert HandlerSettings.from_section(None) == HandlerSettings()  # an archive without a handler section


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"topk": 5, "max_topkk": 3}, "unknown handler settings: max_topkk"),
        ({"threads": "two"}, "threads: expected int, got 'two'"),
        ({"precision": "int4"}, "precision must be one of auto, int8, bf16, fp32"),
    ],
)
def test_a_wrong_handler_section_is_an_error_not_a_silent_default(section, message):
    with pytest.raises(ValueError, match=message):
        HandlerSettings.from_section(section)


def test_build_mar_help_lists_the_settings():
    result = subprocess.run([sys.executable, "-m", "serving.archive", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for f in [*dataclasses.fields(WorkerSettings), *dataclasses.fields(HandlerSettings)]:
        assert f"--{f.name}" in result.stdout, f.name
