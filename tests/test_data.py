"""training.data: both layouts, the split, and every way the data on disk can be wrong."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from carmodel.presets import ClassificationPresetEval, LocatePresetTrain
from training import config as config_lib
from training import data

CLASSES = ["Audi A4 Sedan 2012", "BMW M3 Coupe 2012", "Ram C/V Cargo Van Minivan 2012"]


def write_jpeg(path, size=(80, 40), color=(120, 30, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")


def folder_tree(root, per_class=6, test=False):
    for split in ["train"] + (["test"] if test else []):
        for name in CLASSES:
            for i in range(per_class):
                write_jpeg(root / split / name.replace("/", "-") / f"{i:05d}.jpg")
    return root


def devkit_tree(root, per_class=4):
    """The original distribution's layout, with annotations written by scipy like the real .mat files."""
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CLASSES, dtype=object).reshape(1, -1)})
    for split, annos_path in (
        ("train", root / "devkit" / "cars_train_annos.mat"),
        ("test", root / "cars_test_annos_withlabels.mat"),
    ):
        records = []
        for label, _ in enumerate(CLASSES):
            for i in range(per_class):
                fname = f"{label * per_class + i + 1:05d}.jpg"
                write_jpeg(root / f"cars_{split}" / fname, size=(200, 100))
                records.append((10, 20, 109, 69, label + 1, fname))  # a 100x50 box
        dtype = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
        savemat(annos_path, {"annotations": np.array(records, dtype=dtype).reshape(1, -1)})
    return root


def test_folder_layout_maps_folder_names_back_to_official_names(tmp_path):
    root = folder_tree(tmp_path)
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CLASSES, dtype=object).reshape(1, -1)})
    index = data.scan(root)
    assert index.layout == "folder"
    assert index.classes == sorted(CLASSES, key=lambda n: n.replace("/", "-"))
    assert "Ram C/V Cargo Van Minivan 2012" in index.classes
    assert len(index.train) == 18 and index.test is None


def test_folder_layout_reads_an_optional_test_split(tmp_path):
    index = data.scan(folder_tree(tmp_path, test=True))
    assert len(index.test) == 18
    assert Counter(s.label for s in index.test) == Counter(s.label for s in index.train)


def test_devkit_layout_with_bounding_box_crop(tmp_path):
    root = devkit_tree(tmp_path)
    index = data.scan(root)
    assert index.layout == "devkit" and index.classes == CLASSES
    assert len(index.train) == 12 and len(index.test) == 12
    sample = index.train[0]
    assert sample.bbox == (10, 20, 109, 69)
    assert data.load_image(sample, crop_to_bbox=True).size == (100, 50)
    assert data.load_image(sample, crop_to_bbox=False).size == (200, 100)


def test_devkit_layout_reports_a_missing_annotated_image(tmp_path):
    root = devkit_tree(tmp_path)
    (root / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(data.DatasetError, match="00003.jpg"):
        data.scan(root)


@pytest.mark.parametrize("make_bad", ["missing", "file", "empty_root"])
def test_wrong_root_is_a_clear_error(tmp_path, make_bad):
    root = tmp_path / "cars"
    if make_bad == "file":
        root.write_text("not a folder")
    elif make_bad == "empty_root":
        root.mkdir()
    with pytest.raises(data.DatasetError, match=str(root)):
        data.scan(root)


def test_empty_class_folder_is_named(tmp_path):
    root = folder_tree(tmp_path)
    (root / "train" / "Zzz Empty 2020").mkdir()
    with pytest.raises(data.DatasetError, match="Zzz Empty 2020"):
        data.scan(root)


def test_missing_test_class_folder_is_named(tmp_path):
    root = folder_tree(tmp_path, test=True)
    for f in (root / "test" / "BMW M3 Coupe 2012").iterdir():
        f.unlink()
    (root / "test" / "BMW M3 Coupe 2012").rmdir()
    with pytest.raises(data.DatasetError, match="BMW M3 Coupe 2012"):
        data.scan(root)


def test_corrupt_and_truncated_images_are_all_named_before_training(tmp_path):
    root = folder_tree(tmp_path)
    bad = root / "train" / "Audi A4 Sedan 2012" / "00001.jpg"
    bad.write_bytes(b"\x00garbage" * 10)
    truncated = root / "train" / "BMW M3 Coupe 2012" / "00002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    index = data.scan(root)
    with pytest.raises(data.DatasetError) as err:
        data.decode_all(index.train, crop_to_bbox=False, progress=False)
    assert "2 bad image(s)" in str(err.value)
    assert str(bad) in str(err.value) and str(truncated) in str(err.value)


def test_training_cli_fails_early_with_the_corrupt_file_name(tmp_path, capsys):
    from training import train

    root = folder_tree(tmp_path)
    bad = root / "train" / "Audi A4 Sedan 2012" / "00004.jpg"
    bad.write_bytes(b"not a jpeg")
    code = train.main(
        [
            "--data_root",
            str(root),
            "--output_dir",
            str(tmp_path / "run"),
            "--pretrained",
            "none",
            "--val_fraction",
            "0.34",
            "--test_fraction",
            "0.34",
            "--progress",
            "false",
        ]
    )
    assert code == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "run" / "best.pth").exists()


def test_split_is_stratified_disjoint_and_seeded(tmp_path):
    index = data.scan(folder_tree(tmp_path, per_class=20))
    cfg = config_lib.DataConfig(val_fraction=0.1, test_fraction=0.2, split_seed=3)
    splits = data.make_splits(index, cfg)
    paths = {name: {s.path for s in items} for name, items in splits.items()}
    assert not paths["train"] & paths["val"]
    assert not paths["train"] & paths["test"]
    assert not paths["val"] & paths["test"]
    assert sum(len(p) for p in paths.values()) == 60
    for name, expected in (("test", 4), ("val", 2), ("train", 14)):
        assert Counter(s.label for s in splits[name]) == {0: expected, 1: expected, 2: expected}
    assert data.make_splits(index, cfg)["test"] == splits["test"]
    other = data.make_splits(index, config_lib.DataConfig(val_fraction=0.1, test_fraction=0.2, split_seed=4))
    assert {s.path for s in other["test"]} != paths["test"]


def test_data_cli_reports_counts_and_errors(tmp_path, capsys):
    root = folder_tree(tmp_path, per_class=10)
    manifest = tmp_path / "split.json"
    assert data.main(["--data_root", str(root), "--verify", "--manifest", str(manifest), "--progress", "false"]) == 0
    assert "classes=3" in capsys.readouterr().out and manifest.is_file()
    assert data.main(["--data_root", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_dataset_has_196_official_classes(cars_root):
    index = data.scan(cars_root)
    assert len(index.classes) == 196 and len(index.train) == 6923
    assert "Ram C/V Cargo Van Minivan 2012" in index.classes


# ----------------------------------------------------------------------------- the photos view


def test_uncropped_view_is_the_same_cars_by_class_and_id(tmp_path):
    root = folder_tree(tmp_path, per_class=2)
    for crop in (root / "train").rglob("*.jpg"):
        write_jpeg(root / data.PHOTOS_DIR / crop.relative_to(root / "train"), size=(128, 96))
    samples = data.scan(root).train
    photos = data.uncropped(samples, root)
    assert [p.label for p in photos] == [s.label for s in samples]
    assert [p.path.relative_to(root / "photos") for p in photos] == [
        s.path.relative_to(root / "train") for s in samples
    ]
    assert data.has_photos(root)
    cfg = config_lib.load(overrides={"data_root": str(root)}).data
    assert data.view_samples(samples, "photos", cfg) == (photos, False)
    assert data.view_samples(samples, "crops", cfg) == (samples, cfg.crop_to_bbox)
    with pytest.raises(data.DatasetError, match="unknown view 'thumbnails'"):
        data.view_samples(samples, "thumbnails", cfg)


def test_a_car_without_its_photo_is_named(tmp_path):
    root = folder_tree(tmp_path, per_class=2)
    (root / data.PHOTOS_DIR).mkdir()
    with pytest.raises(data.DatasetError, match=r"6 car\(s\) have no uncropped photo, e.g. .*photos/Audi A4"):
        data.uncropped(data.scan(root).train, root)


def test_every_real_car_has_its_uncropped_photo(cars_root):
    samples = data.scan(cars_root).train
    photos = data.uncropped(samples, cars_root)
    assert len(photos) == len(samples) == 6923
    with Image.open(photos[0].path) as img:
        assert sorted(img.size) == [96, 128]


# ----------------------------------------------------------------------------- boxes and the box head's data


def test_boxes_csv_is_read_and_a_bad_line_is_named(tmp_path):
    (tmp_path / data.PHOTOS_DIR).mkdir()
    csv_file = tmp_path / data.PHOTOS_DIR / data.BOXES_FILE
    csv_file.write_text("id,x1,y1,x2,y2,match,orig_w,orig_h\n00001,8.4,27.73,125.83,90.43,0.95,579,398\n")
    assert data.read_boxes(tmp_path) == {"00001": data.PhotoBox((8.4, 27.73, 125.83, 90.43), 0.95)}
    csv_file.write_text("id,x1,y1,x2,y2,match\n00001,8.4,oops,125.83,90.43,0.95\n")
    with pytest.raises(data.DatasetError, match=r"boxes.csv:2"):
        data.read_boxes(tmp_path)
    with pytest.raises(data.DatasetError, match="box file not found"):
        data.read_boxes(tmp_path / "elsewhere")


def test_every_real_photo_has_its_box_and_most_are_trusted(cars_root):
    boxes = data.photo_boxes(data.uncropped(data.scan(cars_root).train, cars_root), cars_root)
    assert None not in boxes and len(boxes) == 6923
    assert sum(b.match >= 0.8 for b in boxes) / len(boxes) > 0.9


def test_localizing_dataset_gives_the_car_and_the_whole_photo_with_its_box(cars_root):
    crops = data.scan(cars_root).train[:8]
    photos = data.uncropped(crops, cars_root)
    boxes = data.photo_boxes(photos, cars_root)
    kwargs = dict(classify=ClassificationPresetEval(size=64), locate=LocatePresetTrain(size=32, hflip_prob=0.0))
    evaluation = data.LocalizingDataset(crops, photos, boxes, min_match=0.8, evaluation=True, **kwargs)
    for i in range(len(crops)):
        (car, whole), (label, box, weight) = evaluation[i]
        assert car.shape == (3, 64, 64) and whole.shape == (3, 32, 32) and label == crops[i].label
        with Image.open(photos[i].path) as photo:
            expected = torch.tensor(boxes[i].box) / torch.tensor([photo.width, photo.height] * 2)
        assert torch.allclose(box, expected, atol=1e-4)  # the box as fractions of the photo
        assert weight == float(boxes[i].match >= 0.8)
    # training: the car cut from its photo (photo_share 1), the crop as the whole image (locate_crop_share 1)
    cut = data.LocalizingDataset(
        crops,
        photos,
        boxes,
        min_match=0.0,
        photo_share=1.0,
        locate_crop_share=1.0,
        classify=lambda img: img,
        locate=LocatePresetTrain(size=32, hflip_prob=0.0),
    )
    car, _ = cut[0][0]
    x1, y1, x2, y2 = boxes[0].box
    assert 0.85 * (x2 - x1) - 1 <= car.shape[-1] <= 1.35 * (x2 - x1) + 1  # jittered by -5 %..+15 % a side
    assert torch.allclose(cut[0][1][1], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # a crop's box is all of it
