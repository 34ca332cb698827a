"""Stage 4: the car check - a second look, in the classifier's own pass, at each car the detector finds.

The detector sees the whole picture small (its 256x192 canvas), where a face, a person, a coffee cup or
a building can score like a car. Each candidate it finds is cut from the picture at full resolution and
classified at 224 px anyway; the car head (carmodel.models.Localizer.car_head: a GridHead on the same
trunk features as the classes) reads that pass and says whether the cut is a car. A candidate's car
score is the geometric mean of the two (carmodel.predictor.car_score); training.calibrate fits its
threshold. Trunk, classes and detector stay frozen: the head trains on cached features.

Candidates (a picture's best CANDIDATES with a detector score of at least CANDIDATE_FLOOR, or at least its
best one; cut as the server cuts them):
* cars: a box on a car (IoU >= CAR_IOU) in the fitted cars' crops (a third shrunk to thumbnails), in
  their whole photos and in composites of them on the training backgrounds;
* not cars: a box on no car (IoU < NOT_CAR_IOU) in those composites and in pictures without a car:
  training/nocar.py's training pictures and the package pictures kept out of its test set (faces);
* and as many pictures again as half of the above, through one of training's photo conditions (dusk,
  blur, grain, JPEG, faded colour), so that a blurred or dark car stays a car and a blurred wall not.
The head is kept soft (weight decay, label smoothing, few epochs): one sure of all it has seen turns
real cars in poor light down. Val (a model fitted on train alone) measures it; the no-car test
set is never seen here.

Adds `car_head.*` to the run's best.pth, sets `model.car_head` in its config.yaml, writes verifier.json.

    python -m training.verifier --run runs/efficientnet_lite0_photos
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.ops import box_iou
from tqdm import tqdm

from carmodel import models as model_lib
from carmodel.calibration import Calibration
from carmodel.detection import PROVISIONAL_THRESHOLD
from carmodel.errors import exit_with
from carmodel.predictor import Predictor, car_score
from carmodel.runners import make_runner
from training import calibrate, composites, data, nocar, tracking
from training import config as config_lib
from training.detector import photo_scenes, save_heads, with_fresh_heads
from training.evaluate import load_run

log = logging.getLogger(__name__)
REPORT = "verifier.json"
CANDIDATE_FLOOR = 0.2  # below the detect threshold calibrate fits: the head also learns the near misses
CANDIDATES = 3  # per picture, best first
CAR_IOU, NOT_CAR_IOU = 0.5, 0.3  # a candidate between the two is neither: left out
IN_CONDITIONS = 0.5  # of a second draw of the pictures, through a photo condition
EPOCHS, WEIGHT_DECAY, LABEL_SMOOTHING = 8, 0.05, 0.1


def car_scenes(cfg, samples: list[data.Sample], rng: np.random.Generator, composites_count: int, seed: int):
    """The cars' crops (a third shrunk so that their longer side is the augmentation's thumbnail size),
    their whole photos and composites, each with its true boxes."""
    for sample in samples:
        crop = data.load_image(sample, cfg.data.crop_to_bbox)
        if rng.random() < 1 / 3:
            side = int(rng.integers(cfg.augment.downscale_min, cfg.augment.downscale_max + 1))
            crop.thumbnail((side, side), Image.Resampling.LANCZOS)
        yield composites.Scene(crop, [(0.0, 0.0, float(crop.width), float(crop.height))], [sample.label])
    yield from photo_scenes(cfg, samples)
    yield from composites.scenes_of(cfg, samples, "train", composites_count, seed)


def no_car_scenes(cfg, samples: list[data.Sample], rng: np.random.Generator, seed: int) -> Iterator[composites.Scene]:
    for picture in nocar.training_pictures(cfg, samples, rng, seed) + nocar.training_package_pictures():
        yield composites.Scene(picture)


def scenes(cfg, samples: list[data.Sample], composites_count: int, seed: int) -> Iterator[composites.Scene]:
    """The cars' scenes and the pictures without a car, then a second draw of them (half the composites),
    IN_CONDITIONS of which through one photo condition each."""
    for draw, count in ((seed, composites_count), (seed + 1, composites_count // 2)):
        rng = np.random.default_rng(draw)
        drawn = itertools.chain(car_scenes(cfg, samples, rng, count, draw), no_car_scenes(cfg, samples, rng, draw))
        yield from drawn if draw == seed else in_photo_conditions(drawn, rng, IN_CONDITIONS)


def in_photo_conditions(scenes: Iterable[composites.Scene], rng: np.random.Generator, share: float):
    """A `share` of the scenes, each through one of training's photo conditions."""
    alter = calibrate.in_photo_conditions()
    for scene in scenes:
        if rng.random() < share:
            yield dataclasses.replace(scene, image=alter(scene.image))


class TrunkFeatures(nn.Module):
    """A model's trunk alone: images -> its last feature map (what the car head reads)."""

    def __init__(self, model: nn.Module, arch: str):
        super().__init__()
        self.net, self.features = model_lib.base_net(model), model_lib.spec(arch).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.net, x)


def fast_predictor(model, cfg, classes: list[str]) -> Predictor:
    """The run's model as served, compiled by OpenVINO (bf16: ~10x eager torch on this CPU), its
    classifier's runner giving the trunk's features (only `find` and `cut_car` are used: the
    calibration is a placeholder)."""
    model = model.eval()
    features = make_runner(TrunkFeatures(model, cfg.model.arch), cfg.model.eval_size, "openvino", "bf16")
    locator = make_runner(model_lib.DetectPass(model), cfg.model.detect_size, "openvino", "bf16")
    return Predictor(model, cfg.model, classes, features, locator, Calibration(car_threshold=PROVISIONAL_THRESHOLD))


@torch.no_grad()
def candidates(predictor: Predictor, scenes: Iterable[composites.Scene], progress: bool = True, chunk: int = 32):
    """Each scene's candidates as the server cuts them: trunk features (fp16: cached), car labels
    (1 car, 0 not), and the detector's scores. `predictor`: a `fast_predictor`."""
    features, labels, detected = [], [], []

    def flush(group: list[composites.Scene]) -> None:
        prepared = [predictor.prepare(scene.image) for scene in group]
        cuts = []
        for scene, (boxes, scores) in zip(group, predictor.find(prepared), strict=True):
            kept = [(b, s) for b, s in zip(boxes, scores, strict=True) if s >= CANDIDATE_FLOOR][:CANDIDATES]
            kept = kept or list(zip(boxes, scores, strict=True))[:1]
            if not kept:  # not even a candidate above the detector's floor
                continue
            truths = torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4)
            found = torch.tensor([b for b, _ in kept], dtype=torch.float32)
            overlap = box_iou(found, truths).max(1).values if len(truths) else torch.zeros(len(kept))
            for (box, score), iou in zip(kept, overlap.tolist(), strict=True):
                if iou >= CAR_IOU or iou < NOT_CAR_IOU:
                    cuts.append(predictor.cut_car(scene.image, box))
                    labels.append(float(iou >= CAR_IOU))
                    detected.append(score)
        group.clear()
        if cuts:
            features.append(predictor.runner.run(torch.stack(cuts))[0].half())

    group = []
    for scene in tqdm(scenes, desc="candidates", disable=not progress, leave=False):
        group.append(scene)
        if len(group) == chunk:
            flush(group)
    flush(group)
    if not features:
        raise ValueError("the detector found no candidate in any picture: is it trained (training.detector)?")
    return torch.cat(features), torch.tensor(labels), torch.tensor(detected)


def fit_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> list[float]:
    """Binary cross-entropy on smoothed labels, cars and not-cars weighted to count alike; each feature
    map also mirrored."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(labels == 0).sum() / (labels == 1).sum().clamp_min(1))
    losses = []
    head.train()
    for _ in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(256):
            x = features[batch].float()
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = loss_fn(head(x).squeeze(1), labels[batch] * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        losses.append(round(total / len(labels), 4))
    head.eval()
    return losses


@torch.no_grad()
def car_logits(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([head(f.float()).squeeze(1) for f in features.split(512)])


def val_report(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, detected: torch.Tensor) -> dict:
    """How well the detector, the car check and their car score tell val's cars from the rest (AUROC)."""
    y, logits = labels.numpy(), car_logits(head, features)
    counts = {"cars": int(y.sum()), "not_cars": int(len(y) - y.sum())}
    if not all(counts.values()):
        return counts  # AUROC needs both
    return counts | {
        "auroc_detector": round(float(roc_auc_score(y, detected.numpy())), 4),
        "auroc_car_check": round(float(roc_auc_score(y, logits.numpy())), 4),
        "auroc_car_score": round(float(roc_auc_score(y, car_score(detected, logits).numpy())), 4),
    }


def train_verifier(run_dir: Path, composites_count: int = 800, epochs: int = EPOCHS, seed: int = 0) -> dict:
    cfg, classes, _ = load_run(run_dir)
    if not cfg.model.detects:
        raise ValueError(f"{run_dir}: the car check looks again at a detector's cars; train the detector first")
    cfg = config_lib.override(cfg, car_head=True)
    torch.manual_seed(seed)  # the new head's initial weights, and the photo conditions draw from it
    model = with_fresh_heads(run_dir, cfg, classes, ("car_head.",))
    predictor = fast_predictor(model, cfg, classes)
    splits = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)
    if cfg.data.fit_on == "train+val":  # the model learnt val's cars: so does its car check, and nothing is measured
        splits["train"] += splits["val"]
    progress, started = cfg.runtime.progress, time.perf_counter()
    train = splits["train"]
    features, labels, _ = candidates(predictor, scenes(cfg, train, composites_count, seed), progress)
    log.info("%d candidates (%d cars): features in %.0f s", len(labels), labels.sum(), time.perf_counter() - started)
    losses = fit_head(model.car_head, features, labels, epochs, seed)
    report = {"train_candidates": {"cars": int(labels.sum()), "not_cars": int(len(labels) - labels.sum())}}
    report["losses"] = losses
    if cfg.data.fit_on != "train+val":
        val = scenes(cfg, splits["val"], composites_count // 6, seed + 2)
        report["val"] = val_report(model.car_head, *candidates(predictor, val, progress))
    report |= {"epochs": epochs, "seconds": round(time.perf_counter() - started, 1)}
    auroc = report.get("val", {}).get("auroc_car_score")
    save_heads(run_dir, model, cfg, REPORT, report, {} if auroc is None else {"car_check_val_auroc": auroc})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a training run with its detector (training.detector)")
    parser.add_argument("--composites", type=int, default=800, help="composite pictures to take candidates from")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the cached features")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = train_verifier(Path(args.run), args.composites, args.epochs, args.seed)
    except (FileNotFoundError, ValueError, data.DatasetError, tracking.TrackingError) as err:
        return exit_with(err)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
