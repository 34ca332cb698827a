"""Stanford Cars: find the images, check them all, split them, and feed them to training.

Two layouts are read:

* class folders (what ImageFolder reads): ``<root>/train/<class>/*.jpg`` and optionally
  ``<root>/test/<class>/*.jpg``;
* the original devkit: ``<root>/cars_train/``, ``<root>/cars_test/`` and the annotations in
  ``<root>/devkit/*.mat`` (``cars_test_annos_withlabels.mat`` in ``devkit/`` or ``<root>``),
  with the option to crop each photo to its annotated bounding box.

Every problem a user can cause (wrong path, empty or missing class folder, corrupt image) is
raised as a `DatasetError` that names the path, before training starts.

    python -m training.data --data_root ../shared/stanford_cars
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from carmodel.errors import exit_with
from carmodel.images import IMAGE_SUFFIXES, open_image
from carmodel.presets import cut_out
from training import config as config_lib

# Folder names cannot hold "/", so "Ram C/V Cargo Van Minivan 2012" is stored with a "-".
_PATH_SAFE = str.maketrans({"/": "-"})


class DatasetError(ValueError):
    """A problem with the data on disk, with the offending path in the message."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    bbox: tuple[int, int, int, int] | None = None  # x1, y1, x2, y2 (inclusive), devkit only


@dataclass
class CarsIndex:
    classes: list[str]  # official class names, index = label
    train: list[Sample]
    test: list[Sample] | None  # the dataset's own test split, if it has one with labels
    layout: str


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------- layouts


def detect_layout(root: Path) -> str:
    if not root.exists():
        raise DatasetError(f"dataset root does not exist: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset root is not a directory: {root}")
    if (root / "train").is_dir():
        return "folder"
    if (root / "cars_train").is_dir() or (root / "devkit" / "cars_train_annos.mat").is_file():
        return "devkit"
    raise DatasetError(
        f"no Stanford Cars data under {root}: expected {root / 'train'}/<class>/*.jpg "
        f"(class folders) or {root / 'cars_train'} with {root / 'devkit'} (devkit layout)"
    )


def _loadmat(path: Path):
    from scipy.io import loadmat  # only the devkit layout needs scipy

    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        return loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several unrelated types for a bad file
        raise DatasetError(f"cannot read annotation file {path}: {err}") from err


def read_devkit_class_names(root: Path) -> list[str] | None:
    meta = root / "devkit" / "cars_meta.mat"
    if not meta.is_file():
        return None
    return [str(name) for name in _loadmat(meta)["class_names"]]


def official_names(folder_names: list[str], meta_names: list[str] | None) -> list[str]:
    """Map class-folder names back to the dataset's own class names where the devkit is present."""
    if meta_names is None:
        return list(folder_names)
    by_folder = {name.translate(_PATH_SAFE): name for name in meta_names}
    return [by_folder.get(folder, folder) for folder in folder_names]


def _class_folders(split_dir: Path) -> list[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not folders:
        raise DatasetError(f"no class folders in {split_dir}")
    return folders


def _folder_samples(folders: list[Path], labels: dict[str, int]) -> list[Sample]:
    samples = []
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not files:
            raise DatasetError(f"class folder has no images: {folder}")
        samples += [Sample(path, labels[folder.name]) for path in files]
    return samples


def scan_folder_layout(root: Path) -> CarsIndex:
    train_folders = _class_folders(root / "train")
    folder_names = [p.name for p in train_folders]
    labels = {name: i for i, name in enumerate(folder_names)}
    train = _folder_samples(train_folders, labels)

    test = None
    if (root / "test").is_dir():
        test_folders = _class_folders(root / "test")
        test_names = {p.name for p in test_folders}
        if unknown := sorted(test_names - set(labels)):
            raise DatasetError(f"test class folders with no train folder: {', '.join(unknown)} (in {root / 'test'})")
        if missing := sorted(set(labels) - test_names):
            raise DatasetError(
                f"{len(missing)} class folder(s) missing from {root / 'test'}: {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        test = _folder_samples(test_folders, labels)

    classes = official_names(folder_names, read_devkit_class_names(root))
    return CarsIndex(classes, train, test, "folder")


def _devkit_samples(annos_path: Path, image_dir: Path, num_classes: int) -> list[Sample]:
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir}")
    annotations = _loadmat(annos_path)["annotations"]
    samples = []
    for a in annotations:
        label = int(a["class"]) - 1  # the devkit counts classes from 1
        if not 0 <= label < num_classes:
            raise DatasetError(f"{annos_path}: {a['fname']} has class {label + 1}, outside 1..{num_classes}")
        bbox = tuple(int(a[k]) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        samples.append(Sample(image_dir / str(a["fname"]), label, bbox))
    if missing := [s.path for s in samples if not s.path.is_file()]:
        raise DatasetError(f"{len(missing)} annotated image(s) missing, first: {missing[0]}")
    return samples


def scan_devkit_layout(root: Path) -> CarsIndex:
    classes = read_devkit_class_names(root)
    if classes is None:
        raise DatasetError(f"class list not found: {root / 'devkit' / 'cars_meta.mat'}")
    train = _devkit_samples(root / "devkit" / "cars_train_annos.mat", root / "cars_train", len(classes))
    test = None
    for candidate in (root / "cars_test_annos_withlabels.mat", root / "devkit" / "cars_test_annos_withlabels.mat"):
        if candidate.is_file() and (root / "cars_test").is_dir():
            test = _devkit_samples(candidate, root / "cars_test", len(classes))
            break
    return CarsIndex(classes, train, test, "devkit")


def scan(root: str | Path, layout: str = "auto") -> CarsIndex:
    root = Path(root)
    detected = detect_layout(root)
    layout = detected if layout == "auto" else layout
    if layout == "folder":
        return scan_folder_layout(root)
    if layout == "devkit":
        return scan_devkit_layout(root)
    raise DatasetError(f"unknown layout {layout!r}: use auto, folder or devkit")


# ----------------------------------------------------------------------------- images


def load_image(sample: Sample, crop_to_bbox: bool = False, decode_side: int = 0) -> Image.Image:
    """Decode fully (not just the header) so a truncated file fails here, naming itself.
    `decode_side`: decode no larger than a model needs, as the server does (carmodel.images);
    0, or a crop to the bounding box, decodes at full size."""
    cropping = crop_to_bbox and sample.bbox is not None
    try:
        img = open_image(sample.path, 0 if cropping else decode_side)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"corrupt or unreadable image {sample.path}: {err}") from err
    if cropping:
        x1, y1, x2, y2 = sample.bbox
        img = img.crop((max(0, x1), max(0, y1), min(img.width, x2 + 1), min(img.height, y2 + 1)))
    return img


def decode_all(samples: list[Sample], crop_to_bbox: bool, progress: bool = True) -> list[torch.Tensor]:
    """Decode every image once into uint8 tensors; report every bad file at once."""
    images, bad = [], []
    for sample in tqdm(samples, desc="decoding images", disable=not progress, leave=False):
        try:
            images.append(F.pil_to_tensor(load_image(sample, crop_to_bbox)))
        except DatasetError as err:
            bad.append(str(err))
    if bad:
        raise DatasetError(f"{len(bad)} bad image(s):\n  " + "\n  ".join(bad))
    return images


class CarsDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], transform, crop_to_bbox: bool = False, images=None):
        self.samples = samples
        self.transform = transform
        self.crop_to_bbox = crop_to_bbox
        self.images = images  # pre-decoded uint8 tensors, or None to read from disk

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        img = self.images[i] if self.images is not None else load_image(sample, self.crop_to_bbox)
        return self.transform(img), sample.label


# ----------------------------------------------------------------------------- splits


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held_out) with `fraction` of every class held out, reproducibly."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0:
        return list(samples), []
    labels = [s.label for s in samples]
    too_small = sorted(label for label, n in Counter(labels).items() if n < 2)
    if too_small:
        raise DatasetError(f"classes with fewer than 2 images cannot be split: labels {too_small[:10]}")
    rest, held = train_test_split(samples, test_size=fraction, stratify=labels, random_state=seed)
    return rest, held


def _cap_per_class(samples: list[Sample], cap: int | None) -> list[Sample]:
    if cap is None:
        return samples
    seen: Counter = Counter()
    kept = []
    for s in samples:
        if seen[s.label] < cap:
            kept.append(s)
            seen[s.label] += 1
    return kept


def make_splits(index: CarsIndex, cfg: config_lib.DataConfig) -> dict[str, list[Sample]]:
    """train/val/test per `cfg`'s fractions and seed. Without a labelled test split in the dataset,
    test is carved from train."""
    pool = _cap_per_class(index.train, cfg.max_images_per_class)
    if index.test is not None:
        test = _cap_per_class(index.test, cfg.max_images_per_class)
    else:
        pool, test = stratified_split(pool, cfg.test_fraction, cfg.split_seed)
    # Val is a fraction of the whole pool, not of what is left after test.
    val_share = cfg.val_fraction / (1 - (cfg.test_fraction if index.test is None else 0))
    train, val = stratified_split(pool, val_share, cfg.split_seed + 1)
    return {"train": train, "val": val, "test": test}


# ----------------------------------------------------------------------------- views of the same cars

PHOTOS_DIR = "photos"  # <root>/photos/<class>/<id>.jpg: each car of train/ uncropped, as people photograph it
VIEWS = ("crops", "photos", "small_crops")
# `small_crops`: the crops shrunk so that their longer side is this many pixels, like a car in a web thumbnail
SMALL_CROP_SIDE = 100


def has_photos(root: str | Path) -> bool:
    return (Path(root) / PHOTOS_DIR).is_dir()


def uncropped(samples: list[Sample], root: str | Path) -> list[Sample]:
    """The uncropped photo of each car, found by its class folder and id beside its crop in train/.
    The same cars: a split made on the crops is a split by car, a car's crop and photo on one side."""
    root = Path(root)
    photos, missing = [], []
    for sample in samples:
        if not sample.path.is_relative_to(root / "train"):
            raise DatasetError(f"{sample.path} is not under {root / 'train'}: the photos view needs the folder layout")
        photo = root / PHOTOS_DIR / sample.path.relative_to(root / "train")
        (photos if photo.is_file() else missing).append(Sample(photo, sample.label))
    if missing:
        shown = ", ".join(str(s.path) for s in missing[:3])
        raise DatasetError(f"{len(missing)} car(s) have no uncropped photo, e.g. {shown}")
    return photos


def view_samples(samples: list[Sample], view: str, data_cfg) -> tuple[list[Sample], bool]:
    """(samples, crop_to_bbox) of one view of the same cars: `crops` as trained, `photos` uncropped,
    `small_crops` the crops (shrunk when read: `view_longest_side`)."""
    if view in ("crops", "small_crops"):
        return samples, data_cfg.crop_to_bbox
    if view == "photos":
        return uncropped(samples, data_cfg.data_root), False
    raise DatasetError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")


BOXES_FILE = "boxes.csv"  # <root>/photos/boxes.csv: id,x1,y1,x2,y2,match,... in the photo's pixels


@dataclass(frozen=True)
class PhotoBox:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 (x2, y2 exclusive)
    match: float  # how well the crop matched the photo there (normalised correlation)


def read_boxes(root: str | Path) -> dict[str, PhotoBox]:
    """{car id: its box in its uncropped photo} from photos/boxes.csv."""
    import csv

    path = Path(root) / PHOTOS_DIR / BOXES_FILE
    if not path.is_file():
        raise DatasetError(f"box file not found: {path} (a model with a box head trains on the photos' boxes)")
    boxes = {}
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                box = tuple(float(row[k]) for k in ("x1", "y1", "x2", "y2"))
                boxes[row["id"]] = PhotoBox(box, float(row["match"]))
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{path}:{line}: not id,x1,y1,x2,y2,match: {err}") from err
    return boxes


def photo_boxes(photos: list[Sample], root: str | Path) -> list[PhotoBox | None]:
    """Each photo's box (by its file id), None where boxes.csv has none."""
    boxes = read_boxes(root)
    return [boxes.get(s.path.stem) for s in photos]


class LocalizingDataset(torch.utils.data.Dataset):
    """Each car as two inputs for a classifier with a box head (carmodel.models.Localizer):

    * the car to classify: its crop, or (a `photo_share` of the time, when its photo's box is
      trusted) the car cut from its whole photo at a jittered box, as serving cuts it;
    * a whole image to find the car in: its photo with the box, or (a `locate_crop_share` of the
      time) its crop, whose box is all of it.

    Yields ((car, whole), (label, box as fractions, box weight)); the weight is 0 where the box is
    not trusted (boxes.csv's match below `min_match`), so that photo still trains the classes.
    In `evaluation` mode nothing is random: the crop, and the photo with its box.
    """

    def __init__(
        self,
        crops: list[Sample],
        photos: list[Sample],
        boxes: list[PhotoBox | None],
        *,
        classify,
        locate,
        min_match: float,
        photo_share: float = 0.5,
        locate_crop_share: float = 0.3,
        jitter: tuple[float, float] = (-0.05, 0.15),
        crop_images=None,
        photo_images=None,
        crop_to_bbox: bool = False,
        evaluation: bool = False,
    ):
        self.crops, self.photos, self.boxes = crops, photos, boxes
        self.classify, self.locate = classify, locate
        self.min_match, self.photo_share, self.locate_crop_share = min_match, photo_share, locate_crop_share
        self.jitter, self.evaluation = jitter, evaluation
        self.crop_images, self.photo_images, self.crop_to_bbox = crop_images, photo_images, crop_to_bbox

    def __len__(self) -> int:
        return len(self.crops)

    def _image(self, i: int, photo: bool) -> torch.Tensor:
        cache = self.photo_images if photo else self.crop_images
        if cache is not None:
            return cache[i]
        return F.pil_to_tensor(load_image(self.photos[i] if photo else self.crops[i], not photo and self.crop_to_bbox))

    def _chance(self, share: float) -> bool:
        return not self.evaluation and float(torch.rand(())) < share

    def __getitem__(self, i: int):
        found = self.boxes[i]
        trusted = found is not None and found.match >= self.min_match
        if trusted and self._chance(self.photo_share):
            margins = (torch.rand(4) * (self.jitter[1] - self.jitter[0]) + self.jitter[0]).tolist()
            car = cut_out(self._image(i, photo=True), found.box, margins)
        else:
            car = self._image(i, photo=False)
        if found is None or self._chance(self.locate_crop_share):
            whole = self._image(i, photo=False)
            box, weight = (0.0, 0.0, float(whole.shape[-1]), float(whole.shape[-2])), 1.0
        else:
            whole, box, weight = self._image(i, photo=True), found.box, float(trusted)
        whole, box = self.locate(whole, box)
        label = self.crops[i].label
        return (self.classify(car), whole), (label, box, torch.tensor(weight))


def view_longest_side(view: str) -> int | None:
    """How far a view shrinks its images (their longer side, in pixels); None: as they are."""
    return SMALL_CROP_SIDE if view == "small_crops" else None


def split_manifest(index: CarsIndex, splits: dict[str, list[Sample]], root: str | Path) -> dict:
    """What was held out, as paths relative to the data root: the record of a reproducible split."""
    root = Path(root)

    def rel(s: Sample) -> str:
        return str(s.path.relative_to(root)) if s.path.is_relative_to(root) else str(s.path)

    return {
        "layout": index.layout,
        "num_classes": len(index.classes),
        "counts": {name: len(items) for name, items in splits.items()},
        "files": {name: sorted(rel(s) for s in items) for name, items in splits.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_lib.add_arguments(parser)
    parser.add_argument("--verify", action="store_true", help="decode every image to find corrupt files")
    parser.add_argument("--manifest", help="write the train/val/test file lists to this JSON file")
    args = parser.parse_args(argv)
    try:
        cfg = config_lib.from_args(args)
        index = scan(cfg.data.data_root, cfg.data.layout)
        splits = make_splits(index, cfg.data)
        if args.verify:
            decode_all([s for items in splits.values() for s in items], cfg.data.crop_to_bbox, cfg.runtime.progress)
    except (DatasetError, config_lib.ConfigError) as err:
        return exit_with(err)
    manifest = split_manifest(index, splits, cfg.data.data_root)
    print(
        f"layout={index.layout} classes={len(index.classes)} "
        + " ".join(f"{k}={v}" for k, v in manifest["counts"].items())
    )
    if args.manifest:
        Path(args.manifest).write_text(json.dumps(manifest, indent=1))
        print(f"wrote {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
