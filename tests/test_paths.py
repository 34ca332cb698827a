"""carmodel.paths: the project's folders come from the working directory, or $CAR_CLASSIFIER_HOME, at use time
(never from the packages' own location, so that a non-editable install finds them too)."""

from __future__ import annotations

import shutil

import pytest
from helpers import ROOT

from carmodel import paths
from serving.torchserve import ServeError, Server


def test_home_is_the_working_directory_unless_the_variable_names_another(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    home = tmp_path.resolve()
    assert paths.home() == home
    assert paths.default_export() == home / "models" / paths.DEFAULT_MODEL

    other = tmp_path / "checkout"
    other.mkdir()
    monkeypatch.setenv(paths.HOME_ENV, str(other))
    assert paths.home() == other.resolve()
    assert (paths.model_store(), paths.run_dir(), paths.mlruns()) == (
        other.resolve() / "model_store",
        other.resolve() / "var" / "run",
        other.resolve() / "mlruns",
    )


def test_server_defaults_follow_the_home_when_it_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.HOME_ENV, str(tmp_path))
    with pytest.raises(ServeError, match="config.properties not found: run from the project's root"):
        Server()  # a home is a checkout (or the image's /app): TorchServe's configuration is there
    shutil.copy(ROOT / "config.properties", tmp_path)
    server = Server()
    assert server.run_dir == tmp_path.resolve() / "var" / "run"
    assert server.model_store == tmp_path.resolve() / "model_store"
    assert server.props["model_store"] == str(tmp_path.resolve() / "model_store")
