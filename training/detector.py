"""Stage 3: teach a trained Localizer to find every car in a picture, the trunk frozen.

The detector (carmodel.detection: a feature pyramid and FCOS's head) reads three of the trunk's stages,
so the classes, the crops' answers and the int8 classifier stay exactly what stage 2 made. With the
trunk frozen, its features are computed once per picture and the small head trains on them.

Pictures (training/composites.py; the no-car test set's pictures are never among them):
* composites: 0-6 of the fitted cars (train, or train+val for a model fitted on both) pasted at
  48 px to the whole width onto the training backgrounds;
* the fitted cars' real whole photos with their one box (where photos/boxes.csv's box is trusted);
* pictures with no car: road and buildings cut from those photos, synthetic ones, cars cut in pieces
  and shuffled.
Val cars on composites and in their photos measure it (a model fitted on train alone).

Writes `detector.*` into the run's best.pth (the car head, which the detector replaces, is dropped),
`model.detect_size` into its config.yaml, and detector.json.

    python -m training.detector --run runs/efficientnet_lite0_photos
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from carmodel import models as model_lib
from carmodel.detection import PROVISIONAL_THRESHOLD, Decoder, Found, Letterbox, anchor_points, fcos
from carmodel.errors import exit_with
from training import composites, data, nocar, tracking
from training import config as config_lib
from training.evaluate import detection_metrics, load_run

log = logging.getLogger(__name__)
REPORT = "detector.json"
DETECT_SIZE = (256, 192)  # width, height: a 4:3 photo fills it; cost and recall measured in docs/training.md


def photo_scenes(cfg, samples: list[data.Sample]) -> list[composites.Scene]:
    """The cars' whole photos with their one box, where photos/boxes.csv's box is trusted."""
    photos = data.uncropped(samples, cfg.data.data_root)
    scenes = []
    for photo, known in zip(photos, data.photo_boxes(photos, cfg.data.data_root), strict=True):
        if known is not None and known.match >= cfg.data.min_box_match:
            scenes.append(composites.Scene(data.load_image(photo), [tuple(map(float, known.box))], [photo.label]))
    return scenes


def training_scenes(cfg, samples: list[data.Sample], count: int, seed: int) -> Iterator[composites.Scene]:
    """Composites, the real photos and pictures without a car, from these cars (module docstring);
    made one at a time, as the composites are large."""
    rng = np.random.default_rng(seed)
    yield from composites.scenes_of(cfg, samples, "train", count, seed)
    yield from photo_scenes(cfg, samples)
    for picture in nocar.training_pictures(cfg, samples, rng, seed)[: count // 4]:
        yield composites.Scene(picture)


@torch.no_grad()
def pyramid_features(model, canvas: Letterbox, scenes: Iterable[composites.Scene], progress: bool = True):
    """Each scene's trunk pyramid on its canvas (fp16: they are cached), its boxes in canvas pixels, and
    the picture's pixels per canvas pixel and its content's (height, width) on the canvas."""
    pyramid = model_lib.spec(model.arch).pyramid
    net = model_lib.base_net(model).eval()
    levels, targets, scales, contents = [], [], [], []

    def flush(batch: list[torch.Tensor]) -> None:
        out = pyramid(net, torch.stack(batch).contiguous(memory_format=torch.channels_last))
        levels.append([f.half() for f in out])
        batch.clear()

    batch = []
    for scene in tqdm(scenes, desc="pictures", disable=not progress, leave=False):
        tensor, scale = canvas(scene.image)
        batch.append(tensor)
        boxes = torch.tensor(scene.boxes, dtype=torch.float32).reshape(-1, 4) * scale
        targets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        scales.append(1 / scale)
        contents.append(canvas.content(scene.image.size))
        if len(batch) == 32:
            flush(batch)
    if batch:
        flush(batch)
    return [torch.cat(level) for level in zip(*levels, strict=True)], targets, scales, contents


def fit(model, cfg, features: list[torch.Tensor], targets: list[dict], epochs: int, lr: float, seed: int) -> list:
    """FCOS's loss (focal car score, GIoU box, centre-ness) over the cached features; AdamW, cosine."""
    detector = model.detector
    detection = fcos(detector)
    anchors = torch.cat(anchor_points(detection, cfg.model.detect_size))
    per_level = [f.shape[2] * f.shape[3] for f in features]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(targets) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    losses = []
    detector.train()
    for epoch in range(epochs):
        total = 0.0
        for batch in torch.randperm(len(targets), generator=generator).split(32):
            outputs = detector.head(detector.pyramid([f[batch].float() for f in features]))
            loss = detection.compute_loss([targets[i] for i in batch], outputs, [anchors] * len(batch), per_level)
            loss = sum(loss.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(batch)
        losses.append(round(total / len(targets), 4))
        log.info("detector epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    detector.eval()
    return losses


@torch.no_grad()
def detect_cached(model, cfg, features: list[torch.Tensor], contents: list[tuple[int, int]]) -> list[Found]:
    decoder, found = Decoder(model.detector, cfg.model), []
    for start in range(0, len(contents), 64):
        outputs = model.detector([f[start : start + 64].float() for f in features])
        found += decoder.cars(outputs, contents[start : start + 64])
    return found


def train_detector(
    run_dir: Path, composites_count: int = 3000, epochs: int = 14, lr: float = 2e-3, seed: int = 0
) -> dict:
    cfg, classes, _ = load_run(run_dir)
    if not cfg.model.localizes or model_lib.spec(cfg.model.arch).pyramid is None:
        raise ValueError(f"{run_dir}: a detector needs a stage-2 model (box head) of an arch with a feature pyramid")
    cfg = config_lib.override(cfg, car_head=False, detect_size=DETECT_SIZE)
    model = with_fresh_heads(run_dir, cfg, classes, ("car_head.", "detector."))
    torch.manual_seed(seed)
    splits = data.make_splits(data.scan(cfg.data.data_root, cfg.data.layout), cfg.data)
    if cfg.data.fit_on == "train+val":  # the model learnt val's cars: so does its detector, and nothing is measured
        splits["train"] += splits["val"]
    progress, started = cfg.runtime.progress, time.perf_counter()
    canvas = Letterbox(cfg.model)
    scenes = training_scenes(cfg, splits["train"], composites_count, seed)
    features, targets, _, _ = pyramid_features(model, canvas, scenes, progress)
    cars = sum(len(t["boxes"]) for t in targets)
    log.info("%d pictures, %d cars: features in %.0f s", len(targets), cars, time.perf_counter() - started)
    losses = fit(model, cfg, features, targets, epochs, lr, seed)
    report = {"train_pictures": len(targets), "train_cars": cars, "losses": losses}
    if cfg.data.fit_on != "train+val":  # measured on val cars, at the threshold used until calibrate fits one
        val = composites.scenes_of(cfg, splits["val"], "train", composites_count // 6, seed + 1)
        for name, pictures in (("val_composites", val), ("val_photos", photo_scenes(cfg, splits["val"]))):
            val_features, val_targets, scales, contents = pyramid_features(model, canvas, pictures, progress)
            found = detect_cached(model, cfg, val_features, contents)
            boxes = [t["boxes"] * s for t, s in zip(val_targets, scales, strict=True)]
            found = [Found(f.boxes * s, f.scores) for f, s in zip(found, scales, strict=True)]
            report[name] = detection_metrics(found, boxes, PROVISIONAL_THRESHOLD)
    report |= {"epochs": epochs, "detect_size": list(DETECT_SIZE), "seconds": round(time.perf_counter() - started, 1)}
    val_ap50 = {"detector_val_ap50": report["val_composites"]["ap50"]} if "val_composites" in report else {}
    save_heads(run_dir, model, cfg, REPORT, report, val_ap50)
    return report


def with_fresh_heads(run_dir: Path, cfg, classes: list[str], heads: tuple[str, ...]):
    """The run's model as `cfg` builds it, with the run's weights except those of `heads` (prefixes of
    their weights' names), which start as initialised: a rerun of a stage trains its heads afresh."""
    state = torch.load(run_dir / "best.pth", map_location="cpu", weights_only=True)
    model, _ = model_lib.build_for(cfg.model, len(classes))
    model_lib.load_localizer(model, {k: v for k, v in state.items() if not k.startswith(heads)})
    return model


def save_heads(run_dir: Path, model, cfg, name: str, report: dict, metrics: dict) -> None:
    """A stage that adds heads to a finished run: the weights and config written back into it, its report
    `name` beside them, and both tracked (with `metrics`) in the run's MLflow run."""
    torch.save(model.state_dict(), run_dir / "best.pth")
    cfg.save(run_dir / "config.yaml")
    (run_dir / name).write_text(json.dumps(report, indent=1))
    with tracking.tracked(run_dir, cfg.tracking.track, cfg.tracking.experiment, name=run_dir.name) as tracker:
        if metrics:
            tracker.metrics(metrics)
        tracker.artifacts(run_dir / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished stage-2 training run (a model with a box head)")
    parser.add_argument("--composites", type=int, default=3000, help="composite pictures to train on")
    parser.add_argument("--epochs", type=int, default=14, help="passes over the cached features")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = train_detector(Path(args.run), args.composites, args.epochs, args.lr, args.seed)
    except (FileNotFoundError, ValueError, data.DatasetError, tracking.TrackingError) as err:
        return exit_with(err)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
