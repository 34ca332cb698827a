"""training.tune with a real (local) Ray: two tiny trials over the original search space's axes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import python

from training import config as config_lib


@pytest.mark.slow
def test_search_picks_the_trial_with_the_lowest_val_loss(cars_root, tmp_path):
    out = tmp_path / "tune"
    result = python(
        "-m", "training.tune", "--config", "training/configs/resnet50.yaml",
        "--arch", "efficientnet_lite0", "--data_root", str(cars_root), "--max_images_per_class", "2",
        "--val_fraction", "0.5", "--test_fraction", "0", "--train_size", "64", "--eval_size", "64",
        "--trials", "2", "--trial_epochs", "1", "--epochs", "7", "--output_dir", str(out),
        "--batch_sizes", "16", "32", "--unfreeze_choices", "1", "2",
        "--cpus_per_trial", "1", "--gpus_per_trial", "0",
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "best trial:" in result.stdout

    summary = json.loads((out / "tune_results.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 2
    for trial in trials:
        assert 1e-4 <= trial["params"]["lr"] <= 1e-2
        assert trial["params"]["batch_size"] in (16, 32) and trial["params"]["unfreeze"] in (1, 2)
    assert summary["best"]["val_loss"] == min(t["best_val_loss"] for t in trials)
    assert summary["best"]["params"] == trials[0]["params"]

    best = config_lib.load(out / "best_config.yaml")
    best_params = summary["best"]["params"]
    assert (best.optim.lr, best.optim.batch_size, best.finetune.unfreeze) == (
        best_params["lr"],
        best_params["batch_size"],
        best_params["unfreeze"],
    )
    assert best.optim.epochs == 7  # retraining uses the full schedule, not the trial's
    assert best.tune.trials == 2 and best.model.eval_size == 64  # the rest of the config is the one tuned with
    trial_config = Path(summary["best"]["run_dir"]) / "config.yaml"
    assert yaml.safe_load(trial_config.read_text())["optim"]["lr"] == best.optim.lr  # sectioned, like every run's

    # MLflow: one run per trial (Ray's MLflowLoggerCallback) with its params and epochs, plus the summary run
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs([tracking_experiment()], filter_string="tags.stage = 'tune'")
    trial_runs = [r for r in runs if "lr" in r.data.params]
    assert {float(r.data.params["lr"]) for r in trial_runs} >= {t["params"]["lr"] for t in trials}
    assert all("val_loss" in r.data.metrics for r in trial_runs)
    (summary_run,) = [r for r in runs if r.info.run_name == "tune"]
    assert summary_run.data.metrics["best_val_loss"] == summary["best"]["val_loss"]


def tracking_experiment() -> str:
    from training import tracking

    return tracking.experiment_id(tracking.client_mlflow(), config_lib.Config().tracking.experiment)


def test_a_trial_bigger_than_the_machine_is_refused_instead_of_queued_forever(cars_root, tmp_path):
    result = python(
        "-m", "training.tune", "--data_root", str(cars_root), "--gpus_per_trial", "64",
        "--output_dir", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "each trial asks for" in result.stderr and "--gpus_per_trial" in result.stderr


def test_wrong_data_root_fails_before_starting_ray(tmp_path):
    result = python("-m", "training.tune", "--data_root", str(tmp_path / "missing"), "--output_dir", str(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path / "missing") in result.stderr and "Traceback" not in result.stderr
