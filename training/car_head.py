"""Stage 3: teach a trained Localizer to say "no car here", without touching what it already knows.

The car head (carmodel.models.Localizer.car_head) reads the same trunk features as the box head, in
the first pass (the whole image at the locate size), so "is there a car?" costs no extra forward
pass. The network is frozen: the trunk's features are computed once and the small head trains on
them in seconds, so the classes, the box and the int8 path are exactly what stage 2 made.

Positives: the training cars (train+val for a model fitted on both), as crops (a random half shrunk to
thumbnail size) and as whole photos.
Negatives (training/nocar.py): road, buildings and sky cut from the training photos outside each
car's box, synthetic pictures, and training cars cut in pieces and shuffled. Val cars and val
negatives measure it; the no-car test set of training/nocar.py is never seen here. The threshold
is chosen later, on val cars, by training.calibrate.

Adds `car_head.*` to the run's best.pth, sets `model.car_head` in its config.yaml, writes car_head.json.

    python -m training.car_head --run runs/efficientnet_lite0_photos
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from carmodel import models as model_lib
from carmodel.errors import exit_with
from carmodel.presets import locate_preset
from training import config as config_lib
from training import data, nocar, tracking
from training.evaluate import load_run

log = logging.getLogger(__name__)
REPORT = "car_head.json"


def car_pictures(cfg, samples: list[data.Sample], rng: np.random.Generator, thumbnails: bool) -> list[Image.Image]:
    """Each car as its crop and as its whole photo; with `thumbnails`, a random half of the crops
    shrunk so that their longer side is 48-160 px, as web thumbnails are."""
    pictures = []
    for crop_sample, photo_sample in zip(samples, data.uncropped(samples, cfg.data.data_root), strict=True):
        crop = data.load_image(crop_sample, cfg.data.crop_to_bbox)
        if thumbnails and rng.random() < 0.5:
            side = int(rng.integers(cfg.augment.downscale_min, cfg.augment.downscale_max + 1))
            crop.thumbnail((side, side), Image.Resampling.LANCZOS)
        pictures += [crop, data.load_image(photo_sample)]
    return pictures


def no_car_pictures(cfg, samples: list[data.Sample], rng: np.random.Generator, seed: int) -> list[Image.Image]:
    """Backgrounds of these cars' photos (one per photo, where the box is trusted), as many
    synthetic pictures again, and a third as many of these cars shuffled."""
    photos = data.uncropped(samples, cfg.data.data_root)
    pictures = []
    for photo, known in zip(photos, data.photo_boxes(photos, cfg.data.data_root), strict=True):
        if known is not None and known.match >= cfg.data.min_box_match:
            parts = nocar.backgrounds(data.load_image(photo), known.box)
            if parts:
                pictures.append(parts[int(rng.integers(len(parts)))])
    pictures += list(nocar.synthetic(len(pictures), seed))
    for sample in samples[: len(samples) // 3]:
        pictures.append(nocar.shuffled(data.load_image(sample, cfg.data.crop_to_bbox), rng, int(rng.integers(3, 5))))
    return pictures


@torch.no_grad()
def trunk_features(model, cfg, pictures: list[Image.Image], flip: bool = False, progress: bool = True) -> torch.Tensor:
    """The trunk's last feature map of each picture at the locate size (fp16: it is cached)."""
    preset, spec = locate_preset(cfg.model), model_lib.spec(cfg.model.arch)
    net = model_lib.base_net(model).eval()
    out = []
    for start in tqdm(range(0, len(pictures), 64), desc="trunk features", disable=not progress, leave=False):
        batch = torch.stack([preset(p) for p in pictures[start : start + 64]])
        if flip:
            batch = batch.flip(-1)
        out.append(spec.features(net, batch.contiguous(memory_format=torch.channels_last)).half())
    return torch.cat(out)


def fit_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """Binary cross-entropy, the classes weighted to count alike."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
    positive_weight = (labels == 0).sum() / (labels == 1).sum().clamp_min(1)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=positive_weight)
    head.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(256):
            loss = loss_fn(head(features[batch].float()).squeeze(1), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()


@torch.no_grad()
def scores(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(torch.cat([head(f.float()) for f in features.split(512)]).squeeze(1)).numpy()


def mahalanobis_scores(train: torch.Tensor, train_cars: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """For comparison in the report: minus the Mahalanobis distance of each picture's pooled features to
    the training cars' (one mean, their covariance), the feature-space alternative to a learned head."""
    cars = train[train_cars.bool()].float().mean((2, 3))
    mean = cars.mean(0)
    precision = torch.linalg.pinv(torch.cov((cars - mean).T) + 1e-3 * torch.eye(cars.shape[1]))
    pooled = features.float().mean((2, 3)) - mean
    return (-(pooled @ precision * pooled).sum(1)).numpy()


def train_car_head(run_dir: Path, epochs: int = 20, seed: int = 0) -> dict:
    cfg, classes, _ = load_run(run_dir)
    if not cfg.model.localizes:
        raise ValueError(f"{run_dir}: the car head reads the box head's pass; this model has no box head")
    cfg = config_lib.override(cfg, car_head=True)
    model, _ = model_lib.build_for(cfg.model, len(classes), str(run_dir / "best.pth"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    splits = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)
    progress = cfg.runtime.progress
    started = time.perf_counter()

    def extract(split: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cars = car_pictures(cfg, splits[split], rng, thumbnails=True)
        others = no_car_pictures(cfg, splits[split], rng, seed + (split == "val"))
        features = trunk_features(model, cfg, cars + others, flip, progress)
        return features, torch.cat([torch.ones(len(cars)), torch.zeros(len(others))])

    if cfg.data.fit_on == "train+val":  # the model learnt val's cars: so does its head, and nothing is measured
        splits["train"] += splits["val"]
    train_x, train_y = extract("train", flip=False)
    flipped_x, flipped_y = extract("train", flip=True)  # other thumbnails, backgrounds and shuffles, mirrored
    fit_head(model.car_head, torch.cat([train_x, flipped_x]), torch.cat([train_y, flipped_y]), epochs, seed)
    report = {"train_pictures": {"cars": int(train_y.sum() * 2), "no_car": int((1 - train_y).sum() * 2)}}
    if cfg.data.fit_on != "train+val":
        val_x, val_y = extract("val", flip=False)
        report |= {
            "val_pictures": {"cars": int(val_y.sum()), "no_car": int((1 - val_y).sum())},
            "val_auroc": round(float(roc_auc_score(val_y.numpy(), scores(model.car_head, val_x))), 4),
            "val_auroc_mahalanobis": round(
                float(roc_auc_score(val_y.numpy(), mahalanobis_scores(train_x, train_y, val_x))), 4
            ),
        }
    report |= {"epochs": epochs, "seconds": round(time.perf_counter() - started, 1)}
    torch.save(model.state_dict(), run_dir / "best.pth")
    cfg.save(run_dir / "config.yaml")
    (run_dir / REPORT).write_text(json.dumps(report, indent=1))
    with tracking.tracked(run_dir, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        if "val_auroc" in report:
            tracker.metrics({"car_head_val_auroc": report["val_auroc"]})
        tracker.artifacts(run_dir / REPORT)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished stage-2 training run (a model with a box head)")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the cached features")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = train_car_head(Path(args.run), args.epochs, args.seed)
    except (FileNotFoundError, ValueError, data.DatasetError, tracking.TrackingError) as err:
        return exit_with(err)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
