"""data.extra_train: the training set is the labelled set followed by extra COCO sets of the same categories
(Data Distillation's pseudo-labels); another category list is an error naming the file."""

import json

import numpy as np
import pytest

from detkit.app.build import build_data_loader, build_dataset, raw_dataset
from detkit.data.concat import ConcatDetection
from detkit.data.mosaic import Mosaic
from detkit.errors import ConfigError


def write_extra(tiny_builtin, path, rename=None):
    """The built-in val split as an extra COCO set (a pseudo-label file of the same categories), optionally with
    one category renamed."""
    data = json.loads((tiny_builtin / "annotations" / "instances_val.json").read_text())
    if rename is not None:
        data["categories"][rename]["name"] = "seven"
    path.write_text(json.dumps(data))
    return f"data.extra_train=[{{json: {path}, images: {tiny_builtin / 'images' / 'val'}}}]"


def test_training_reads_the_labelled_set_then_the_extra_set(tiny_train_config, tiny_builtin, tmp_path):
    extra = write_extra(tiny_builtin, tmp_path / "pseudo.json")
    cfg = tiny_train_config(extra, "data.mosaic.prob=0")
    raw = raw_dataset(cfg.data, "train")
    labelled = raw_dataset(cfg.data, "train", with_extra=False)
    val = raw_dataset(cfg.data, "val")
    assert isinstance(raw, ConcatDetection) and len(raw) == len(labelled) + len(val) == 24 + 8
    assert raw.class_names == labelled.class_names and raw.label_to_category_id == labelled.label_to_category_id
    for i in (0, 23, 24, 31):  # the seam: image 24 is the extra set's first
        part, j = (labelled, i) if i < 24 else (val, i - 24)
        boxes, labels = raw.get_sample(i).boxes, raw.get_sample(i).labels
        np.testing.assert_array_equal(boxes, part.targets(j)[0])
        np.testing.assert_array_equal(labels, part.targets(j)[1])
        assert raw.image_ids[i] == part.image_ids[j]
    # the training pipeline over it: transforms, Mosaic, the loader
    assert len(build_dataset(cfg.data, "train")) == 32
    mosaic = build_dataset(tiny_train_config(extra).data, "train")
    assert isinstance(mosaic, Mosaic) and len(mosaic) == 32
    images, targets = next(iter(build_data_loader(mosaic, cfg.data, train=True)))
    assert images.shape == (8, 3, 96, 96) and len(targets) == 8


def test_an_extra_set_of_other_categories_is_an_error_naming_it(tiny_train_config, tiny_builtin, tmp_path):
    bad = tmp_path / "other_classes.json"
    cfg = tiny_train_config(write_extra(tiny_builtin, bad, rename=3), "data.mosaic.prob=0")
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\]: .*other_classes\.json has category id 7 'seven' "
                                          r"for label 3, the training set .*instances_train\.json has id 7 '3'"):
        build_dataset(cfg.data, "train")
    with pytest.raises(ConfigError, match=r"data.extra_train\[0\] must be \{json: FILE, images: DIR\}"):
        raw_dataset(tiny_train_config(f"data.extra_train=[{{json: {bad}}}]").data, "train")
