"""Train a Stanford Cars classifier.

Writes to ``--output_dir``: ``best.pth`` (state_dict with the lowest val loss; with
``--fit_on train+val``, the last epoch's),
``checkpoint.pt`` (to ``--resume`` an interrupted run), ``metrics.csv``/``metrics.json``
(one row per epoch), ``curves.png``, ``config.yaml``, ``classes.json``, ``split.json``.

    python -m training.train --config configs/efficientnet_lite0.yaml
    python -m training.train --config configs/resnet50.yaml --epochs 20 --device cuda
    python -m training.train --config configs/efficientnet_lite0.yaml --fit_on train  # find the epochs on val
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import config as config_lib
from training import data, plots, presets, tracking
from training import model as model_lib

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- runtime


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    # True on CPUs with AVX512-BF16 or AMX, where oneDNN runs bf16 convolutions natively.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- pieces


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be adam, adamw or sgd; got {cfg.optimizer!r}")


def make_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Per-step schedule: linear warm-up, then cosine / step / constant."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** ((step // steps_per_epoch) // cfg.lr_step_epochs)
        if cfg.lr_schedule == "constant":
            return 1.0
        raise ValueError(f"lr_schedule must be cosine, step or constant; got {cfg.lr_schedule!r}")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_epoch(
    model,
    loader,
    criterion,
    device,
    dtype,
    *,
    optimizer=None,
    scheduler=None,
    scaler=None,
    channels_last=False,
    frozen=(),
    desc="",
    progress=True,
) -> tuple[float, float]:
    """One pass over `loader`; trains when an optimizer is given. Returns (mean loss, top-1)."""
    training = optimizer is not None
    if training:
        model_lib.train_mode(model, list(frozen))
    else:
        model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    with torch.set_grad_enabled(training):
        for inputs, targets in bar:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(inputs)
            loss = criterion(logits.float(), targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return total_loss / max(1, seen), correct / max(1, seen)


@torch.no_grad()
def extract_features(trunk, loader, device, dtype, channels_last, progress) -> torch.utils.data.TensorDataset:
    """Run a frozen trunk once; the head then trains on its outputs at a tiny fraction of the cost."""
    trunk.eval()
    feats, labels = [], []
    for inputs, targets in tqdm(loader, desc="caching trunk features", disable=not progress, leave=False):
        inputs = inputs.to(device)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            feats.append(trunk(inputs).float().cpu())
        labels.append(targets)
    return torch.utils.data.TensorDataset(torch.cat(feats), torch.cat(labels))


def write_history(history: list[dict], out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(history, indent=1))
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plots.training_curves(history, out / "curves.png")


# ----------------------------------------------------------------------------- data


def prepare_data(cfg):
    """Scan, split and (optionally) decode once. Every data problem surfaces here, not mid-epoch."""
    index = data.scan(cfg.data_root, cfg.layout)
    splits = data.make_splits(index, cfg)
    if cfg.fit_on == "train+val":
        splits = {"train": splits["train"] + splits["val"], "val": [], "test": splits["test"]}
    images = {}
    for name in ("train", "val"):
        if cfg.cache_images:
            images[name] = data.decode_all(splits[name], cfg.crop_to_bbox, cfg.progress)
        else:  # still decode everything once so a corrupt file is found now, not in epoch 7
            data.decode_all(splits[name], cfg.crop_to_bbox, cfg.progress)
            images[name] = None
    return index, splits, images


def make_loader(dataset, cfg, shuffle: bool, generator=None):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.num_workers,
        generator=generator,
        persistent_workers=cfg.num_workers > 0,
    )


# ----------------------------------------------------------------------------- fit


RUN_ARTIFACTS = ("config.yaml", "split.json", "metrics.csv", "curves.png", "train_summary.json")


def fit(cfg, report=None) -> dict:
    """Train per `cfg`, tracked in MLflow. `report(metrics_row)` is called after every epoch (Ray Tune uses it)."""
    model_lib.spec(cfg.arch)  # an unknown architecture fails before minutes of decoding
    out = Path(cfg.output_dir)
    if not cfg.resume:  # a new training in an old folder is a new MLflow run; --resume continues its run
        (out / tracking.RUN_FILE).unlink(missing_ok=True)
    with tracking.tracked(out, cfg.track, cfg.experiment, name=out.name) as tracker:
        tracker.params(cfg.to_dict())
        tracker.tags({"stage": "train", "arch": cfg.arch, "fit_on": cfg.fit_on})

        def after_epoch(row: dict) -> None:
            tracker.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
            if report is not None:
                report(row)

        summary = train(cfg, out, after_epoch)
        tracker.metrics(summary)
        tracker.artifacts(*(out / name for name in RUN_ARTIFACTS))
    return summary


def train(cfg, out: Path, report) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)
    channels_last = cfg.channels_last and device.type != "mps"

    index, splits, images = prepare_data(cfg)
    final_fit = cfg.fit_on == "train+val"
    cfg.save(out / "config.yaml")
    (out / "classes.json").write_text(json.dumps(index.classes, indent=1))
    (out / "split.json").write_text(json.dumps(data.split_manifest(index, splits, cfg.data_root), indent=1))

    model, init = model_lib.build_model(cfg.arch, len(index.classes), cfg.pretrained, cfg.dropout)
    frozen = model_lib.freeze(model, cfg.arch, cfg.unfreeze)
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    total, trainable = model_lib.count_parameters(model)
    log.info(
        "device=%s amp=%s channels_last=%s params=%s trainable=%s init=%s",
        device,
        dtype,
        channels_last,
        f"{total:,}",
        f"{trainable:,}",
        init,
    )

    train_set = data.CarsDataset(splits["train"], presets.train_preset(cfg), cfg.crop_to_bbox, images["train"])
    val_set = data.CarsDataset(splits["val"], presets.eval_preset(cfg), cfg.crop_to_bbox, images["val"])
    train_loader = make_loader(train_set, cfg, shuffle=True, generator=generator)
    val_loader = make_loader(val_set, cfg, shuffle=False)

    # A frozen trunk gives the same features every epoch (given no augmentation): compute them once.
    net = model
    head = model_lib.head_module(model, cfg.arch)
    if cfg.unfreeze == 0 and cfg.cache_features:
        head_path = model_lib.spec(cfg.arch).head
        model.set_submodule(head_path, nn.Identity())
        cached_train_set = data.CarsDataset(
            splits["train"], presets.eval_preset(cfg), cfg.crop_to_bbox, images["train"]
        )
        feats_train = extract_features(
            model, make_loader(cached_train_set, cfg, False), device, dtype, channels_last, cfg.progress
        )
        feats_val = (
            None if final_fit else extract_features(model, val_loader, device, dtype, channels_last, cfg.progress)
        )
        model.set_submodule(head_path, head)
        net, frozen, channels_last = head, [], False
        train_loader = make_loader(feats_train, cfg, shuffle=True, generator=generator)
        val_loader = None if final_fit else make_loader(feats_val, cfg, shuffle=False)
        log.info("trunk frozen: trained the head on cached features")

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # Val loss is the training objective (label smoothing included), as in torchvision's references:
    # plain cross-entropy rises as a smoothed model keeps getting more photos right, so early
    # stopping on it stopped our first full run at 81 % val accuracy while accuracy was still climbing.
    val_criterion = criterion
    optimizer = make_optimizer(cfg, net.parameters())
    scheduler = make_scheduler(cfg, optimizer, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    history, best_val_loss, start_epoch, stale = [], math.inf, 1, 0
    if cfg.resume:
        ckpt = torch.load(cfg.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history, best_val_loss, stale = ckpt["history"], ckpt["best_val_loss"], ckpt["stale"]
        start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s at epoch %d", cfg.resume, start_epoch)

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        train_loss, train_acc = run_epoch(
            net,
            train_loader,
            criterion,
            device,
            dtype,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            channels_last=channels_last,
            frozen=frozen,
            desc=f"epoch {epoch}/{cfg.epochs}",
            progress=cfg.progress,
        )
        if final_fit:  # nothing held out to select on: the schedule's last epoch is the model
            val_loss = val_acc = None
        else:
            val_loss, val_acc = run_epoch(
                net,
                val_loader,
                val_criterion,
                device,
                dtype,
                channels_last=channels_last,
                desc="val",
                progress=cfg.progress,
            )
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": round(train_loss, 5),
            "train_acc": round(train_acc, 5),
            "val_loss": None if final_fit else round(val_loss, 5),
            "val_acc": None if final_fit else round(val_acc, 5),
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(row)
        improved = final_fit or val_loss < best_val_loss
        if improved:
            best_val_loss, stale = (math.inf if final_fit else val_loss), 0
            torch.save(model.state_dict(), out / "best.pth")
        else:
            stale += 1
        write_history(history, out)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_val_loss": best_val_loss,
                "stale": stale,
            },
            out / "checkpoint.pt",
        )
        val_text = "no val (train+val fit)" if final_fit else f"val loss {val_loss:.3f} acc {val_acc:.3f}"
        log.info(
            "epoch %d: train loss %.3f acc %.3f | %s | %.0fs%s",
            epoch,
            train_loss,
            train_acc,
            val_text,
            row["seconds"],
            " *" if improved and not final_fit else "",
        )
        report(row)
        if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
            log.info("early stop: val loss has not improved for %d epochs", stale)
            break

    best = history[-1] if final_fit else min(history, key=lambda r: r["val_loss"])
    summary = {
        "fit_on": cfg.fit_on,
        "train_images": len(splits["train"]),
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "best_val_acc": best["val_acc"],
        "epochs_run": len(history),
        "init": init,
        "device": str(device),
        "amp": str(dtype),
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = config_lib.from_args(args)
        summary = fit(cfg)
    except (
        data.DatasetError,
        config_lib.ConfigError,
        model_lib.PretrainedWeightsError,
        tracking.TrackingError,
        ValueError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
