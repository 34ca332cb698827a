"""Exploratory data analysis of Stanford Cars: what is on disk, before anything is trained on it.

For the train split, and the test split when the dataset has one, it reports:

* file extensions (counted case-insensitively);
* image resolutions: width, height and aspect ratio (min / median / mean / max, plus histograms);
* PIL modes and channel counts;
* images per class (min / median / mean / max, the smallest and largest classes, a bar chart);
* unreadable files, each with its error; they are counted, never fatal.

Only image headers are read (PIL opens lazily and knows size and mode from the header), so the
whole dataset takes seconds. The images are described as stored: `crop_to_bbox` is not applied.

Outputs in `--out_dir`: `eda.json` (every number), `eda.md` (a readable report) and the PNG plots
it embeds.

    python -m training.eda --data_root ../shared/stanford_cars --out_dir reports/eda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from carmodel.errors import exit_with
from training import config as config_lib
from training import plots
from training.data import CarsIndex, DatasetError, Sample, scan

DEFAULT_OUT_DIR = "reports/eda"
EXTREME_CLASSES = 5  # how many of the smallest and of the largest classes the report names
HISTOGRAM_BINS = 40
NO_EXTENSION = "(none)"
# What PIL raises for a file it cannot parse: a bad header, a truncated file, an absurd size.
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------- collecting


def read_header(path: Path) -> dict:
    """Size and mode from the image header; the pixels are never decoded."""
    with Image.open(path) as img:
        width, height = img.size
        return {"width": width, "height": height, "mode": img.mode, "channels": len(img.getbands())}


def extension_of(path: Path) -> str:
    return path.suffix.lower() or NO_EXTENSION


def collect_stats(samples: list[Sample], progress: bool = False, desc: str = "reading headers") -> dict:
    """Raw per-image measurements of one split: the lists the summary and the plots are made from."""
    stats = {
        "extensions": Counter(),
        "modes": Counter(),
        "channels": Counter(),
        "labels": Counter(),
        "widths": [],
        "heights": [],
        "unreadable": [],
    }
    for sample in tqdm(samples, desc=desc, disable=not progress, leave=False):
        # Every file counts towards its extension and class, readable or not: that is what is on disk.
        stats["extensions"][extension_of(sample.path)] += 1
        stats["labels"][sample.label] += 1
        try:
            header = read_header(sample.path)
        except UNREADABLE_ERRORS as err:
            stats["unreadable"].append({"path": str(sample.path), "error": f"{type(err).__name__}: {err}"})
            continue
        stats["modes"][header["mode"]] += 1
        stats["channels"][header["channels"]] += 1
        stats["widths"].append(header["width"])
        stats["heights"].append(header["height"])
    return stats


# ----------------------------------------------------------------------------- summarising


def distribution(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 3),
        "max": max(values),
    }


def aspect_ratios(stats: dict) -> list[float]:
    return [w / h for w, h in zip(stats["widths"], stats["heights"], strict=True)]


def most_common_first(counter: Counter) -> dict:
    # JSON keys must be strings; channel counts are ints.
    return {str(key): count for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def images_per_class(stats: dict, classes: list[str]) -> dict[str, int]:
    """Every class, in label order, including any with no images in this split."""
    return {name: stats["labels"][label] for label, name in enumerate(classes)}


def class_balance(per_class: dict[str, int]) -> dict:
    by_count = sorted(per_class.items(), key=lambda kv: (kv[1], kv[0]))
    largest = sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        **distribution(list(per_class.values())),
        "empty_classes": sum(1 for n in per_class.values() if n == 0),
        "smallest": [{"class": name, "images": n} for name, n in by_count[:EXTREME_CLASSES]],
        "largest": [{"class": name, "images": n} for name, n in largest[:EXTREME_CLASSES]],
    }


def summarise(stats: dict, classes: list[str]) -> dict:
    """The numbers of one split, JSON-ready."""
    per_class = images_per_class(stats, classes)
    return {
        "num_images": sum(stats["extensions"].values()),
        "num_readable": len(stats["widths"]),
        "num_unreadable": len(stats["unreadable"]),
        "extensions": most_common_first(stats["extensions"]),
        "modes": most_common_first(stats["modes"]),
        "channels": most_common_first(stats["channels"]),
        "width": distribution(stats["widths"]),
        "height": distribution(stats["heights"]),
        "aspect_ratio": distribution([round(r, 3) for r in aspect_ratios(stats)]),
        "class_balance": class_balance(per_class),
        "images_per_class": per_class,
        "unreadable": stats["unreadable"],
    }


def split_samples(index: CarsIndex) -> dict[str, list[Sample]]:
    splits = {"train": index.train}
    if index.test is not None:
        splits["test"] = index.test
    return splits


# ----------------------------------------------------------------------------- plots


def write_plots(split: str, stats: dict, summary: dict, out_dir: Path) -> dict[str, str]:
    """PNG files for one split; returns {what: file name relative to out_dir}."""
    files = {}
    per_class = sorted(summary["images_per_class"].items(), key=lambda kv: (-kv[1], kv[0]))
    files["images_per_class"] = f"{split}_images_per_class.png"
    plots.bar_chart(
        dict(per_class),
        out_dir / files["images_per_class"],
        title=f"images per class, {split} ({len(per_class)} classes, largest first)",
        xlabel="class",
    )
    if not stats["widths"]:  # nothing readable: no sizes to plot
        return files
    histograms = {
        "width": (stats["widths"], "width (px)"),
        "height": (stats["heights"], "height (px)"),
        "aspect_ratio": (aspect_ratios(stats), "width / height"),
    }
    for name, (values, xlabel) in histograms.items():
        files[name] = f"{split}_{name}.png"
        plots.histogram(
            values,
            out_dir / files[name],
            title=f"{name.replace('_', ' ')}, {split}",
            xlabel=xlabel,
            bins=HISTOGRAM_BINS,
        )
    return files


# ----------------------------------------------------------------------------- markdown


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _count_table(title: str, counts: dict) -> str:
    return markdown_table([title, "images"], [[key, n] for key, n in counts.items()])


def _distribution_table(summary: dict) -> str:
    rows = []
    for name in ("width", "height", "aspect_ratio"):
        dist = summary[name]
        if dist is not None:
            rows.append([name.replace("_", " "), dist["min"], dist["median"], dist["mean"], dist["max"]])
    return markdown_table(["", "min", "median", "mean", "max"], rows) if rows else "_no readable images_"


def _class_table(entries: list[dict]) -> str:
    return markdown_table(["class", "images"], [[e["class"], e["images"]] for e in entries])


def split_markdown(split: str, summary: dict) -> list[str]:
    balance = summary["class_balance"]
    files = summary["plots"]
    lines = [
        f"## {split}",
        "",
        f"{summary['num_images']} images, {summary['num_readable']} readable, {summary['num_unreadable']} unreadable.",
        "",
        "### File extensions",
        "",
        _count_table("extension", summary["extensions"]),
        "",
        "### Resolution",
        "",
        _distribution_table(summary),
        "",
    ]
    lines += [
        f"![{name.replace('_', ' ')}]({files[name]})" for name in ("width", "height", "aspect_ratio") if name in files
    ]
    lines += [
        "",
        "### Modes and channels",
        "",
        _count_table("PIL mode", summary["modes"]),
        "",
        _count_table("channels", summary["channels"]),
        "",
        "### Images per class",
        "",
        markdown_table(
            ["min", "median", "mean", "max", "classes with no images"],
            [[balance["min"], balance["median"], balance["mean"], balance["max"], balance["empty_classes"]]],
        ),
        "",
        f"Smallest {len(balance['smallest'])} classes:",
        "",
        _class_table(balance["smallest"]),
        "",
        f"Largest {len(balance['largest'])} classes:",
        "",
        _class_table(balance["largest"]),
        "",
        f"![images per class]({files['images_per_class']})",
        "",
        "### Unreadable",
        "",
    ]
    if summary["unreadable"]:
        lines.append(markdown_table(["file", "error"], [[u["path"], u["error"]] for u in summary["unreadable"]]))
    else:
        lines.append("None: every file has a readable image header.")
    lines.append("")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# Stanford Cars: exploratory data analysis",
        "",
        (
            f"Data root `{report['data_root']}`, layout `{report['layout']}`, {report['num_classes']} classes, "
            f"{report['num_images']} images in all. "
            "Images are described as stored (headers only, no bounding-box crop)."
        ),
        "",
    ]
    if "test" not in report["splits"]:
        lines += ["The dataset has no labelled test split: only train is described.", ""]
    for split, summary in report["splits"].items():
        lines += split_markdown(split, summary)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- driver


def run_eda(data_root: str | Path, layout: str, out_dir: str | Path, progress: bool = False) -> dict:
    """Scan, measure, plot and write eda.json + eda.md; returns the report."""
    index = scan(data_root, layout)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, samples in split_samples(index).items():
        stats = collect_stats(samples, progress, desc=f"reading headers ({split})")
        summary = summarise(stats, index.classes)
        summary["plots"] = write_plots(split, stats, summary, out_dir)
        splits[split] = summary
    report = {
        "data_root": str(data_root),
        "layout": index.layout,
        "num_classes": len(index.classes),
        "num_images": sum(s["num_images"] for s in splits.values()),
        "num_unreadable": sum(s["num_unreadable"] for s in splits.values()),
        "splits": splits,
    }
    (out_dir / "eda.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out_dir / "eda.md")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument(
        "--out_dir", default=DEFAULT_OUT_DIR, help=f"where the report goes (default: {DEFAULT_OUT_DIR})"
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.from_args(args)
        report = run_eda(cfg.data.data_root, cfg.data.layout, args.out_dir, cfg.runtime.progress)
    except (DatasetError, config_lib.ConfigError) as err:
        return exit_with(err)
    for split, summary in report["splits"].items():
        print(f"{split}: {summary['num_images']} images, {summary['num_unreadable']} unreadable")
    print(f"layout={report['layout']} classes={report['num_classes']} images={report['num_images']}")
    print(f"wrote {Path(args.out_dir) / 'eda.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
