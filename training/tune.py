"""Hyper-parameter search with Ray Tune, each trial a normal `training.train.fit` run.

Default search space = the original project's: lr log-uniform 1e-4..1e-2, batch size
{16, 32, 64}, unfreeze the last {1, 2} blocks; ASHA stops poor trials early; the best trial
is the one with the lowest val loss. Its directory is a complete training run, ready for
`training.evaluate` and `training.export`.

    python -m training.tune --config training/configs/resnet50.yaml                  # local
    python -m training.tune --config training/configs/resnet50.yaml --ray_address ray://head:10001
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from carmodel.errors import exit_with
from training import config as config_lib
from training import data, tracking

log = logging.getLogger(__name__)


def search_space(lr_range=(1e-4, 1e-2), batch_sizes=(16, 32, 64), unfreeze=(1, 2)) -> dict:
    from ray import tune

    return {
        "lr": tune.loguniform(*lr_range),
        "batch_size": tune.choice(list(batch_sizes)),
        "unfreeze": tune.choice(list(unfreeze)),
    }


def trainable(params: dict, base: dict) -> None:
    """One trial: the base config (flat) with this trial's parameters, reporting every epoch to Tune."""
    from ray import tune

    from training.train import fit

    trial = {"output_dir": tune.get_context().get_trial_dir(), "progress": False}
    trial["track"] = False  # Ray's MLflowLoggerCallback logs each trial (run_search)
    fit(config_lib.load(overrides={**base, **params, **trial}), report=lambda row: tune.report(row))


def check_local_resources(cfg) -> None:
    """Ray queues a trial that asks for more than the machine has forever; say so instead."""
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if cfg.tune.gpus_per_trial > gpus or cfg.tune.cpus_per_trial > cpus:
        raise config_lib.ConfigError(
            f"each trial asks for {cfg.tune.cpus_per_trial:g} CPUs and {cfg.tune.gpus_per_trial:g} GPUs; this machine "
            f"has {cpus} and {gpus}: set --cpus_per_trial / --gpus_per_trial (or --ray_address for a cluster)"
        )


def run_search(cfg, space: dict, storage: Path) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Trials run in their own working directory (and maybe on another node): no relative paths.
    # Flat, like the search space's keys (lr, batch_size, unfreeze) that each trial sets on it.
    base = cfg.to_flat_dict()
    base["data_root"] = str(Path(cfg.data.data_root).resolve())
    base["epochs"] = cfg.tune.trial_epochs
    if cfg.finetune.pretrained not in ("imagenet", "none"):
        base["pretrained"] = str(Path(cfg.finetune.pretrained).resolve())

    if not cfg.tune.ray_address:
        check_local_resources(cfg)
    ray.init(
        address=cfg.tune.ray_address,
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=False,
    )  # locally Ray sees every CPU and GPU; trials share them per cpus/gpus_per_trial
    scheduler = ASHAScheduler(
        time_attr="epoch", max_t=cfg.tune.trial_epochs, grace_period=min(3, cfg.tune.trial_epochs), reduction_factor=2
    )
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(trainable, base=base), {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
        ),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=cfg.tune.trials, scheduler=scheduler),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(storage.resolve()), verbose=1, callbacks=mlflow_callbacks(cfg)
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="val_loss", mode="min", scope="all")
    trials = [
        {
            "params": {k: r.config[k] for k in space},
            "best_val_loss": float(r.metrics_dataframe["val_loss"].min()),
            "best_val_acc": float(r.metrics_dataframe["val_acc"].max()),
            "epochs": int(r.metrics_dataframe["epoch"].max()),
            "path": r.path,
        }
        for r in results
        if r.metrics_dataframe is not None and not r.metrics_dataframe.empty
    ]
    summary = {
        "best": {
            "params": {k: best.config[k] for k in space},
            "val_loss": float(best.metrics_dataframe["val_loss"].min()),
            "run_dir": best.path,
        },
        "trials": sorted(trials, key=lambda t: t["best_val_loss"]),
    }
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "tune_results.json").write_text(json.dumps(summary, indent=1))
    # Retraining runs the full schedule, not the trial's.
    best_cfg = config_lib.load(overrides={**base, **summary["best"]["params"], "epochs": cfg.optim.epochs})
    best_cfg.save(storage / "best_config.yaml")
    ray.shutdown()
    with tracking.tracked(storage, cfg.tracking.track, cfg.tracking.experiment, name="tune") as tracker:
        tracker.params({f"best.{k}": v for k, v in summary["best"]["params"].items()})
        tracker.metrics({"best_val_loss": summary["best"]["val_loss"], "trials": len(trials)})
        tracker.tags({"stage": "tune"})
        tracker.artifacts(storage / "tune_results.json", storage / "best_config.yaml")
    return summary


def mlflow_callbacks(cfg) -> list:
    """One MLflow run per trial: its parameters and every epoch's metrics (Ray's own integration)."""
    if not cfg.tracking.track:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    mlflow = tracking.client_mlflow()
    tracking.experiment_id(mlflow, cfg.tracking.experiment)  # created with the project's artifact location
    return [
        MLflowLoggerCallback(
            tracking_uri=tracking.tracking_uri(), experiment_name=cfg.tracking.experiment, tags={"stage": "tune"}
        )
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument("--address", dest="setting_ray_address", help="an existing Ray cluster (same as --ray_address)")
    parser.add_argument("--lr_range", type=float, nargs=2, default=(1e-4, 1e-2))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=(16, 32, 64))
    parser.add_argument("--unfreeze_choices", type=int, nargs="+", default=(1, 2))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = config_lib.from_args(args)
        if cfg.data.fit_on != "train":
            raise config_lib.ConfigError("tune selects trials by val loss: run it with --fit_on train")
        data.scan(cfg.data.data_root, cfg.data.layout)  # fail on a wrong path before starting Ray
        space = search_space(args.lr_range, args.batch_sizes, args.unfreeze_choices)
        summary = run_search(cfg, space, Path(cfg.runtime.output_dir))
    except (data.DatasetError, config_lib.ConfigError, tracking.TrackingError, ValueError) as err:
        return exit_with(err)
    best = summary["best"]
    print(f"best trial: {best['params']} val_loss={best['val_loss']:.4f}\n  run dir: {best['run_dir']}")
    print(
        f"  all trials: {Path(cfg.runtime.output_dir) / 'tune_results.json'}; "
        f"retrain with: python -m training.train --config {Path(cfg.runtime.output_dir) / 'best_config.yaml'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
