"""The EDA stage on a tiny hand-made dataset (exact counts), on the real data, and on a wrong path.

Run from the repository root: `.venv/bin/python -m pytest -q tests/test_eda.py`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from training import eda

REAL_DATA = Path("../shared/stanford_cars")
REAL_CLASSES = 196
REAL_TRAIN_IMAGES = 6923


def _save(path: Path, mode: str, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL picks the format from the extension, and does not know ".JPG" in upper case.
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new(mode, size, color=0).save(path, format=fmt)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Two classes, six files: mixed sizes, modes and extension case, and one corrupt file."""
    root = tmp_path / "cars"
    _save(root / "train" / "Audi A4" / "a.jpg", "RGB", (40, 30))
    _save(root / "train" / "Audi A4" / "b.JPG", "RGB", (50, 50))
    _save(root / "train" / "Audi A4" / "c.png", "RGBA", (20, 10))
    (root / "train" / "Audi A4" / "corrupt.jpg").write_bytes(random.Random(0).randbytes(512))
    _save(root / "train" / "BMW M3" / "d.jpg", "L", (30, 60))
    _save(root / "train" / "BMW M3" / "e.png", "RGB", (25, 25))
    return root


def test_tiny_dataset_exact_counts(tiny_dataset: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "eda"
    assert eda.main(["--data_root", str(tiny_dataset), "--out_dir", str(out_dir), "--progress", "false"]) == 0

    report = json.loads((out_dir / "eda.json").read_text())
    assert report["layout"] == "folder"
    assert report["num_classes"] == 2
    assert report["num_images"] == 6
    assert set(report["splits"]) == {"train"}  # no test folder, no test split

    train = report["splits"]["train"]
    assert train["extensions"] == {".jpg": 4, ".png": 2}
    assert train["modes"] == {"RGB": 3, "L": 1, "RGBA": 1}
    assert train["channels"] == {"3": 3, "1": 1, "4": 1}
    assert train["images_per_class"] == {"Audi A4": 4, "BMW M3": 2}
    assert train["num_readable"] == 5
    assert train["width"] == {"min": 20, "median": 30, "mean": 33.0, "max": 50}
    assert train["height"]["min"] == 10 and train["height"]["max"] == 60
    assert train["class_balance"]["smallest"][0] == {"class": "BMW M3", "images": 2}
    assert train["class_balance"]["largest"][0] == {"class": "Audi A4", "images": 4}

    assert train["num_unreadable"] == 1
    [bad] = train["unreadable"]
    assert Path(bad["path"]).name == "corrupt.jpg"
    assert bad["error"]

    markdown = (out_dir / "eda.md").read_text()
    assert "corrupt.jpg" in markdown
    assert set(train["plots"]) == {"images_per_class", "width", "height", "aspect_ratio"}
    for png in train["plots"].values():
        assert (out_dir / png).is_file()
        assert f"]({png})" in markdown  # embedded by a path relative to eda.md


def test_real_dataset(tmp_path: Path) -> None:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA} (run from the repository root)")
    out_dir = tmp_path / "eda"
    assert eda.main(["--data_root", str(REAL_DATA), "--out_dir", str(out_dir), "--progress", "false"]) == 0

    report = json.loads((out_dir / "eda.json").read_text())
    assert report["num_classes"] == REAL_CLASSES
    assert report["num_images"] == REAL_TRAIN_IMAGES
    train = report["splits"]["train"]
    assert len(train["images_per_class"]) == REAL_CLASSES
    assert sum(train["images_per_class"].values()) == REAL_TRAIN_IMAGES
    assert train["num_unreadable"] == 0
    assert (out_dir / "eda.md").is_file()


def test_wrong_data_root_is_a_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_dataset"
    assert eda.main(["--data_root", str(missing), "--out_dir", str(tmp_path / "eda")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert str(missing) in err
    assert not (tmp_path / "eda").exists()  # nothing written for a failed run


def test_help_exits_cleanly(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        eda.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out_dir" in capsys.readouterr().out
