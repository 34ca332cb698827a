"""MLflow tracking and registry (training/tracking.py, training/register.py, training.register --download, build-mar)
and the gate (training/gate.py), against a real local MLflow store (conftest: one per session)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
from helpers import DEFAULT_EXPORT, python

from training import registry, tracking

# ------------------------------------------------------------------------------ the gate


def metrics_file(tmp_path: Path, top1: float, recalls: dict[str, float] | None = None, name="m.json") -> Path:
    recalls = recalls or {"Audi A4 2012": 0.9, "BMW M3 2012": 0.8}
    metrics = {
        "split": "test",
        "num_images": 100,
        "top1": top1,
        "per_class": {cls: {"recall": r, "precision": r, "f1-score": r, "support": 5} for cls, r in recalls.items()},
    }
    path = tmp_path / name
    path.write_text(json.dumps(metrics))
    return path


def gate(*args: str):
    result = python("-m", "training.gate", *args)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr  # one line, whatever the verdict
    return result.returncode, lines[0]


def test_gate_approves_a_model_above_the_minimum(tmp_path):
    code, line = gate("--metrics", str(metrics_file(tmp_path, 0.70)))
    assert code == 0 and line.startswith("APPROVED: top-1 70.00%") and ">= 65.00%" in line


def test_gate_rejects_below_the_minimum(tmp_path):
    code, line = gate("--metrics", str(metrics_file(tmp_path, 0.64)), "--min_top1", "0.65")
    assert code == 1 and line == "REJECTED: top-1 64.00% on test (100 images) is below the minimum 65.00%"


def test_gate_per_class_floor_names_the_weak_classes(tmp_path):
    metrics = metrics_file(tmp_path, 0.9, {"Audi A4 2012": 0.9, "BMW M3 2012": 0.2})
    code, line = gate("--metrics", str(metrics), "--min_class_recall", "0.3")
    assert code == 1 and "1 class(es) below recall 30%: BMW M3 2012 20%" in line
    code, _ = gate("--metrics", str(metrics), "--min_class_recall", "0.2")
    assert code == 0


def test_gate_floor_on_whole_photos(tmp_path):
    metrics = metrics_file(tmp_path, 0.9)
    code, line = gate("--metrics", str(metrics), "--min_top1_photos", "0.75")
    assert code == 2 and "needs whole-photo figures" in line  # crops only: it cannot decide
    values = json.loads(metrics.read_text())
    values["views"] = {"crops": {"top1": 0.9, "num_images": 100}, "photos": {"top1": 0.70, "num_images": 100}}
    metrics.write_text(json.dumps(values))
    code, line = gate("--metrics", str(metrics), "--min_top1_photos", "0.75")
    assert code == 1 and line == "REJECTED: whole-photo top-1 70.00% on 100 photos is below the minimum 75.00%"
    code, line = gate("--metrics", str(metrics), "--min_top1_photos", "0.65")
    assert code == 0 and "whole photos 70.00% >= 65.00%" in line


def test_gate_rejects_a_regression_beyond_the_margin(tmp_path):
    production = metrics_file(tmp_path, 0.86, name="production.json")
    code, line = gate("--metrics", str(metrics_file(tmp_path, 0.84)), "--baseline", str(production))
    assert code == 1 and "2.00% below" in line and "allowed 1.00%" in line
    code, line = gate("--metrics", str(metrics_file(tmp_path, 0.855)), "--baseline", str(production))
    assert code == 0 and "-0.50% vs" in line


@pytest.mark.parametrize("content", [None, "not json", '{"top5": 0.9}'])
def test_gate_cannot_decide_on_missing_or_bad_metrics(tmp_path, content):
    path = tmp_path / "metrics.json"
    if content is not None:
        path.write_text(content)
    code, line = gate("--metrics", str(path))
    assert code == 2 and line.startswith("ERROR: ")


# ------------------------------------------------------------------------------ tracking


def client():
    from mlflow import MlflowClient

    tracking.client_mlflow()
    return MlflowClient()


@pytest.mark.slow  # the session's smoke training: part of the training paths
def test_training_evaluation_and_export_log_to_one_mlflow_run(resnet50_export, mlflow_store):
    """The session's ResNet-50 smoke run (conftest) went through train -> export (which evaluates)."""
    record = json.loads((resnet50_export / tracking.RUN_FILE).read_text())
    assert record["tracking_uri"] == mlflow_store
    run = client().get_run(record["run_id"])
    assert run.data.params["arch"] == "resnet50" and run.data.params["epochs"] == "1"
    assert run.data.params["trials"] == "6"  # the settings by name, as the flags
    assert run.data.tags["stage"] == "train"
    history = client().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1]  # per epoch
    assert 0 <= run.data.metrics["test_top1"] <= 1 and run.data.metrics["test_num_images"] > 0
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert {"curves.png", "metrics.csv", "config.yaml", "eval_test", "export"} <= artifacts
    exported = {Path(a.path).name for a in client().list_artifacts(run.info.run_id, "export")}
    assert {"resnet50_cars.pth", "index_to_name.json", "metrics.json"} <= exported
    # the artifacts live next to the test store, not in the project
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(Path(mlflow_store[10:]).parent)


@pytest.mark.slow
def test_tracking_can_be_switched_off(cars_root, tmp_path):
    from helpers import smoke_train

    export = smoke_train(tmp_path, cars_root, "efficientnet_lite0", pretrained="none", track="false")
    assert not (tmp_path / "run" / tracking.RUN_FILE).exists() and not (export / tracking.RUN_FILE).exists()


@pytest.mark.slow
def test_register_gate_against_production_and_build_from_the_registry(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(DEFAULT_EXPORT, export)
    name = "efficientnet_lite0_cars"
    registered = python("-m", "training.register", "--export", str(export), "--alias", "candidate")
    assert registered.returncode == 0, registered.stderr
    version = registered.stdout.split(" version ")[1].split()[0]
    found = registry.model_version(f"{name}@candidate")
    assert str(found.version) == version and float(found.tags["top1"]) == pytest.approx(
        json.loads((export / "metrics.json").read_text())["top1"], abs=1e-4
    )

    # no production alias yet: nothing to regress against, and the gate says so
    code, line = gate("--metrics", str(export / "metrics.json"), "--baseline", f"models:/{name}@production")
    assert code == 0 and "no models:/efficientnet_lite0_cars@production yet" in line
    promoted = python("-m", "training.register", "--name", name, "--version", version, "--alias", "production")
    assert promoted.returncode == 0, promoted.stderr
    worse = metrics_file(tmp_path, 0.80)
    code, line = gate("--metrics", str(worse), "--baseline", f"models:/{name}@production")
    assert code == 1 and f"(version {version})" in line

    store, fetched = tmp_path / "store", tmp_path / "fetched"
    download = python("-m", "training.register", "--name", name, "--alias", "production", "--download", str(fetched))
    assert download.returncode == 0, download.stderr
    built = python("-m", "serving.archive", "--export", str(fetched), "--model_store", str(store))
    assert built.returncode == 0, built.stderr
    archive = store / f"{name}_v{version}.0.mar"
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
        assert mar.read(f"{name}.pth") == (DEFAULT_EXPORT / f"{name}.pth").read_bytes()
    assert {"index_to_name.json", "model.yaml", f"{name}_int8.xml"} <= names
    assert "config.yaml" not in names  # training's config stays out of the archive


def test_registry_errors_are_clear(tmp_path, capsys):
    """training.register's own main, in this process (MLflow imported once, not per command)."""
    from training import register

    fetch = ["--download", str(tmp_path / "fetched"), "--alias", "production", "--name"]
    assert register.main([*fetch, "no_such_model"]) == 2
    assert "no registered model 'no_such_model@production'" in capsys.readouterr().err
    assert register.main([*fetch, "not a name"]) == 2
    assert "NAME@ALIAS or NAME/VERSION" in capsys.readouterr().err
    assert register.main(["--name", "efficientnet_lite0_cars", "--version", "99", "--alias", "x"]) == 2
    assert "has no version 99" in capsys.readouterr().err
