"""scripts/train_tiny_sd.py's leakage-controlled option: --exclude-classes leaves those classes' images out of the
generator's training set, names an unknown class, and a work folder of another training set is refused."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from scripts.train_tiny_sd import check_work_folder, load_images


def test_excluded_classes_never_reach_the_training_set():
    x, labels, src = load_images(300)
    kept_x, kept, kept_src = load_images(300, ["Bag", "Ankle boot"])
    assert len(kept_x) == len(kept) == len(kept_src) == int(np.isin(labels, [0, 1, 2, 3, 4, 5, 6, 7]).sum())
    assert not np.isin(kept, [8, 9]).any() and np.isin(labels, [8, 9]).any()
    assert {kept_src.sample(i).label_name for i in range(len(kept_src))}.isdisjoint({"Bag", "Ankle boot"})
    with pytest.raises(SystemExit, match="'Purse'.*not Fashion-MNIST classes"):
        load_images(10, ["Purse"])


def test_a_work_folder_of_another_training_set_is_refused(tmp_path):
    args = argparse.Namespace(train_stop=50000, exclude_classes=["Bag"])
    check_work_folder(tmp_path, args)
    check_work_folder(tmp_path, args)  # the same set: resumes
    with pytest.raises(SystemExit, match="another training set"):
        check_work_folder(tmp_path, argparse.Namespace(train_stop=50000, exclude_classes=[]))
