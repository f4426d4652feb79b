"""configs/data/voc.yaml and yolo.yaml build their readers, and a bad dataset stops before training with the
reader's own error (as for COCO)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from detkit.app.build import build_dataset, eval_img_size
from detkit.data.mosaic import Mosaic
from detkit.data.validation import DatasetError
from detkit.data.voc import VOCDetection
from detkit.data.yolo_txt import YoloTxtDetection
from detkit.errors import ConfigError
from detkit.utils.resolvers import scaled_size

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def voc_root(tmp_path, formats):
    formats.write_voc(tmp_path / "VOC2007", split="trainval")
    formats.write_voc(tmp_path / "VOC2007", split="test")
    formats.write_voc(tmp_path / "VOC2012", split="trainval")
    return tmp_path


def test_voc_config_trains_on_07_12_and_evaluates_on_07_test(tmp_path, formats):
    cfg = compose_config("train", ["data=voc", f"data.root={voc_root(tmp_path, formats)}",
                                   "data.class_names=[a,b,c]", "data.img_size=416"])
    assert isinstance(build_dataset(cfg.data, "train"), Mosaic)  # the default recipe: Mosaic for half the samples
    cfg.data.mosaic.prob = 0.0
    train, val = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "val")
    assert isinstance(train, VOCDetection) and len(train) == 6 and len(val) == 3
    image, target = train[1]
    assert image.shape == (3, 416, 416) and len(target["boxes"]) == 1  # the difficult box is not a target


def test_yolo_config_and_bad_data_stops_at_construction(tmp_path, formats):
    images = formats.write_yolo(tmp_path / "yolo")
    overrides = ["data=yolo", f"data.train_images={images}", f"data.val_images={images}", "data.names=[a,b,c]",
                 "data.img_size=128"]
    cfg = compose_config("train", overrides)
    assert isinstance(build_dataset(cfg.data, "val"), YoloTxtDetection)
    (tmp_path / "yolo" / "labels" / "second.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"second\.txt: image 2 \('second\.png'\), line 1: unknown class id"):
        build_dataset(cfg.data, "train")
    with pytest.warns(UserWarning, match="dropped 0 of 3 images and 1 of 3 boxes"):
        build_dataset(compose_config("train", [*overrides, "data.on_invalid=drop"]).data, "train")


def test_test_size_sets_the_evaluation_letterbox_only(tmp_path, formats):
    images = formats.write_yolo(tmp_path / "yolo")
    overrides = ["data=yolo", f"data.train_images={images}", f"data.val_images={images}", "data.names=[a,b,c]",
                 "data.img_size=128", "data.mosaic.prob=0"]
    unset = compose_config("train", overrides).data
    assert unset.test_size is None and eval_img_size(unset) == 128
    with pytest.raises(ConfigError, match="data.img_size is null: training chooses it"):
        build_dataset(compose_config("train", overrides[:-2]).data, "val")  # data=yolo leaves it to training
    cfg = compose_config("train", [*overrides, "data.test_size=192"]).data
    assert eval_img_size(cfg) == 192
    assert build_dataset(cfg, "train")[0][0].shape[-2:] == (128, 128)
    image, target = build_dataset(cfg, "val")[0]
    assert image.shape[-2:] == (192, 192)
    # the recorded geometry (used to map detections back to original pixels) is that of the evaluation size
    assert target["ratio"] == pytest.approx(192 / max(target["orig_size"]))


def test_builtin_data_evaluates_above_the_training_size_except_fixed_size_models():
    assert eval_img_size(compose_config("train", []).data) == 480  # 384 x 1.25
    assert eval_img_size(compose_config("train", ["data.img_size=96"]).data) == 128  # 120 to a multiple of 32
    cfg = compose_config("train", ["model=yolov1_cpu", "data.img_size=448"])
    assert eval_img_size(cfg.data) == cfg.model.input_size == 448  # the FC head takes no other size
    assert eval_img_size(compose_config("train", ["data.test_size=null"]).data) == 384
    chosen = compose_config("eval", ["data=builtin", "checkpoint=x"]).data  # tools/eval.py data=builtin: no model
    assert eval_img_size(chosen) == 480 and chosen.builtin.seed == 0


def test_scaled_size_rounds_to_the_stride_and_rejects_nonsense():
    assert [scaled_size(s, 1.25) for s in (384, 352, 96, 8)] == [480, 448, 128, 32]
    assert scaled_size(300, 1.0, 1) == 300
    with pytest.raises(ValueError, match="positive"):
        scaled_size(384, 0)


@pytest.mark.parametrize("data", ["builtin", "coco", "voc", "yolo"])
def test_every_data_config_composes_the_shared_augment_mosaic_and_multiscale_groups(data):
    cfg = compose_config("train", [f"data={data}", "augment@data.augment=yolo", "data.mosaic.prob=0.25",
                                   "data.multiscale.every=5"]).data
    assert cfg.augment._target_ == "detkit.data.augment.AugmentTransform" and cfg.augment.preset == "yolo"
    assert cfg.mosaic.prob == 0.25 and cfg.multiscale.every == 5 and list(cfg.multiscale.sizes) == []
    assert cfg.augment.fliplr == (0.0 if data == "builtin" else 0.5)  # digits are not mirror-symmetric
    plain = compose_config("train", [f"data={data}"]).data
    assert plain.augment._target_ == "detkit.data.transforms.TrainTransform"
    # the built-in recipe on every dataset: Mosaic for half the samples, closed out in the last epoch; batch 8
    assert (plain.mosaic.prob, plain.mosaic.close_last, plain.batch_size) == (0.5, 1, 8)
