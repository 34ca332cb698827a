"""training/composites.py: the scenes of several cars the detector trains and is tested on, from real crops."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from training import composites, data
from training import config as config_lib


@pytest.fixture(scope="module")
def cfg(cars_root):
    smoke = {"max_images_per_class": 4, "val_fraction": 0.25, "test_fraction": 0.25}
    return config_lib.override(config_lib.Config(), data_root=str(cars_root), **smoke)


def test_scenes_repeat_from_their_seed_and_every_car_is_inside_and_visible(cfg):
    first, again = (list(composites.scenes(cfg, "test", 8, seed=3)) for _ in range(2))
    assert [s.to_dict() for s in first] == [s.to_dict() for s in again]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(first, again, strict=True))
    test_labels = {s.label for s in data.make_splits(data.scan(cfg.data.data_root), cfg.data)["test"]}
    assert sum(len(s.boxes) for s in first) > 8
    for scene in first:
        width, height = scene.image.size
        assert len(scene.boxes) == len(scene.labels) <= composites.MAX_CARS
        assert set(scene.labels) <= test_labels
        for index, (x1, y1, x2, y2) in enumerate(scene.boxes):
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert x2 - x1 >= composites.MIN_CAR_WIDTH or y2 - y1 == height
            later = scene.boxes[index + 1 :]
            assert composites.visible_share((x1, y1, x2, y2), later) >= composites.MIN_VISIBLE


def test_training_and_test_backgrounds_never_meet(cfg):
    splits = data.make_splits(data.scan(cfg.data.data_root), cfg.data)
    train = composites.Backgrounds(cfg, "train", splits["train"], seed=0)
    test = composites.Backgrounds(cfg, "test", splits["test"], seed=0)

    def digests(pictures) -> set[str]:
        return {hashlib.sha1(p.tobytes()).hexdigest() for p in pictures}

    assert train.surroundings and test.surroundings and train.others and test.others
    assert not digests(train.surroundings + train.others) & digests(test.surroundings + test.others)


def test_the_command_writes_the_scenes_and_their_boxes(cars_root, tmp_path):
    assert (
        composites.main(["--split", "val", "--count", "3", "--data_root", str(cars_root), "--out", str(tmp_path)]) == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == ["val_0000.jpg", "val_0001.jpg", "val_0002.jpg"]
