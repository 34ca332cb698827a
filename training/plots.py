"""PNG plots for the reports. Uses the Agg backend: training boxes usually have no display."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: list[dict], path: Path) -> None:
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "val"):
        loss_ax.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        acc_ax.plot(epochs, [row[f"{split}_acc"] for row in history], marker="o", label=split)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="top-1 accuracy", xlabel="epoch", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix(matrix, path: Path) -> None:
    # 196 classes: tick labels would be unreadable, the structure (the diagonal and its
    # off-diagonal clusters of sibling model years) is what this picture is for.
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(matrix, cmap="viridis", interpolation="nearest")
    ax.set(title="confusion matrix (row-normalised)", xlabel="predicted class", ylabel="true class")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_chart(values: dict, path: Path, title: str, xlabel: str, log: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([str(k) for k in values], list(values.values()))
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    if log:
        ax.set_yscale("log")
    if len(values) > 20:
        ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def histogram(values, path: Path, title: str, xlabel: str, bins: int = 40) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=bins)
    ax.set(title=title, xlabel=xlabel, ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability(views: dict, path: Path, bins: int) -> None:
    """Reliability diagrams, one per view: accuracy against top-1 probability in `bins` bins, before
    and after calibration. `views`: {view: training.evaluate.Confidence}."""
    fig, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 4.2), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (view, c) in zip(axes[0], views.items(), strict=True):
        for confidence, label in ((c.uncalibrated, "uncalibrated"), (c.calibrated, "calibrated")):
            which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
            used = [b for b in range(bins) if (which == b).any()]
            ax.plot(
                [confidence[which == b].mean() for b in used],
                [c.correct[which == b].mean() for b in used],
                marker="o",
                label=label,
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        ax.set(title=view, xlabel="top-1 probability", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
