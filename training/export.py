"""Export a trained run for serving: the export folder of carmodel/export.py.

The serving files (weights, index_to_name.json, model.yaml, calibration.json), then training's record beside them:
metrics.json (the held-out evaluation of exactly these weights), config.yaml (the whole training
config), split.json (which files were train/val/test, so held-out checks stay held out), plots.

python -m training.export --run runs/efficientnet_lite0 --export_dir models/efficientnet_lite0_cars
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from carmodel.calibration import CALIBRATION
from carmodel.errors import exit_with
from carmodel.export import METRICS, SPLIT, TRAINING_CONFIG, ExportDir
from training import config as config_lib
from training import data, detector, model_card, tracking, verifier
from training.calibrate import CALIBRATION_FROM
from training.evaluate import evaluate_run, load_run


def export_run(run_dir: Path, export_dir: Path | None = None, split: str = "test") -> Path:
    cfg, classes, model = load_run(run_dir)
    export_dir = export_dir or cfg.resolved_export_dir()
    metrics_file = run_dir / f"eval_{split}.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else evaluate_run(run_dir, split)

    export = ExportDir(export_dir)
    export.save(model, classes, cfg.model)
    metrics = {**metrics, "training": training_summary(run_dir), "training_from": from_stage(cfg)}
    metrics["teachers"] = teachers(cfg)
    if (run_dir / CALIBRATION_FROM).is_file():  # the train-only run whose val answers fitted the calibration
        metrics["calibration_from"] = json.loads((run_dir / CALIBRATION_FROM).read_text())
    export.record(METRICS).write_text(json.dumps(metrics, indent=1))
    cfg.save(export.record(TRAINING_CONFIG))
    confusion = [png.name for png in sorted(run_dir.glob(f"confusion_{split}*.png"))]  # one per view
    reliability = [png.name for png in sorted(run_dir.glob(f"reliability_{split}.png"))]
    reports = (detector.REPORT, verifier.REPORT, tracking.RUN_FILE)
    for extra in (CALIBRATION, SPLIT, "curves.png", *confusion, *reliability, "metrics.csv", *reports):
        if (run_dir / extra).is_file():
            shutil.copy(run_dir / extra, export_dir / extra)
    # logged to the training's run
    with tracking.tracked(export_dir, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        tracker.directory(export_dir, tracking.EXPORT_ARTIFACT)
    model_card.write(export_dir)
    return export_dir


def training_summary(run_dir: Path) -> dict | None:
    summary = run_dir / "train_summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def start_run(cfg) -> Path | None:
    """The run whose weights this one started from (stage 1 of a two-stage recipe), if any."""
    pretrained = cfg.finetune.pretrained
    return Path(pretrained).parent if pretrained not in ("none", "imagenet") else None


def from_stage(cfg) -> dict | None:
    """The summary of the run this one started from, for the card's total time."""
    stage = start_run(cfg)
    return training_summary(stage) if stage else None


def teachers(cfg) -> list[dict]:
    """The runs that taught this one or the stage it started from (optim.distill_from): each one's
    architecture and summary, for the card's recipe and total time."""
    stage = start_run(cfg)
    stage_cfg = config_lib.load(stage / "config.yaml") if stage and (stage / "config.yaml").is_file() else None
    found = []
    for run in (*cfg.optim.distill_from, *(stage_cfg.optim.distill_from if stage_cfg else ())):
        teacher_cfg = Path(run) / "config.yaml"
        arch = config_lib.load(teacher_cfg).model.arch if teacher_cfg.is_file() else None
        found.append({"run": run, "arch": arch, "training": training_summary(Path(run))})
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training output directory")
    parser.add_argument("--export_dir", help="default: exports/<arch>_cars")
    parser.add_argument("--split", default="test", help="which evaluation to ship as metrics.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_run(Path(args.run), Path(args.export_dir) if args.export_dir else None, args.split)
    except (FileNotFoundError, data.DatasetError, config_lib.ConfigError, tracking.TrackingError) as err:
        return exit_with(err)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
