"""The train split cut into labelled and unlabelled parts over the same images (data=builtin_semi)."""

import json

import pytest

from detkit.app.build import prepare_data, raw_dataset
from detkit.data.labelled_split import ensure_labelled_split, split_labelled
from detkit.errors import ConfigError


def test_split_is_disjoint_complete_and_keeps_only_the_labelled_annotations(tiny_builtin):
    data = json.loads((tiny_builtin / "annotations" / "instances_train.json").read_text())
    labelled, unlabelled = split_labelled(data, 10, seed=0)
    ids = {im["id"] for im in labelled["images"]}
    assert len(ids) == 10 and len(unlabelled["images"]) == 14
    assert ids.isdisjoint(im["id"] for im in unlabelled["images"])
    assert sorted([*ids, *(im["id"] for im in unlabelled["images"])]) == sorted(im["id"] for im in data["images"])
    assert labelled["annotations"] == [a for a in data["annotations"] if a["image_id"] in ids]
    assert unlabelled["annotations"] == [] and labelled["categories"] == unlabelled["categories"] == data["categories"]
    assert split_labelled(data, 10, seed=0) == (labelled, unlabelled)
    assert split_labelled(data, 10, seed=1)[0]["images"] != labelled["images"]
    assert len(split_labelled(data, 10, seed=0, num_unlabelled=5)[1]["images"]) == 5
    with pytest.raises(ConfigError, match="cannot cut 20 labelled and 5 unlabelled images out of the 24 images"):
        split_labelled(data, 20, num_unlabelled=5)


def test_builtin_semi_trains_on_the_labelled_part(tiny_train_config, tiny_builtin, tmp_path):
    cfg = tiny_train_config("data=builtin_semi", "data.generate.num_labelled=10", "data.mosaic.prob=0",
                            f"data.generate.out_dir={tmp_path / 'semi'}")
    prepare_data(cfg.data)
    assert raw_dataset(cfg.data, "train").ann_file == tmp_path / "semi" / "labelled.json"
    assert len(raw_dataset(cfg.data, "train")) == 10 and len(raw_dataset(cfg.data, "val")) == 8
    unlabelled = json.loads((tmp_path / "semi" / "unlabelled.json").read_text())
    assert len(unlabelled["images"]) == 14 and unlabelled["annotations"] == []
    stamp = (tmp_path / "semi" / "labelled.json").stat().st_mtime_ns
    ensure_labelled_split(**{k: v for k, v in cfg.data.generate.items() if k != "_target_"})  # kept: same settings
    assert (tmp_path / "semi" / "labelled.json").stat().st_mtime_ns == stamp
    default = tiny_train_config("data=builtin_semi").data.generate
    assert default.num_labelled == 1000 and default.out_dir == f"{tiny_builtin}/annotations/semi_1000_seed0"
