"""The built-in data cut for joint training (configs/data/builtin_wordtree.yaml): a detection split without the
classification-only digits' boxes, a classification split of images with an image_label and no boxes, over the
same image files; the loader carries image_label to the targets."""

import json

import numpy as np
import pytest

from detkit.app.build import build_data_loader, build_dataset, prepare_data, raw_dataset
from detkit.data.coco import CocoDetection
from detkit.errors import ConfigError
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def joint_cfg(tiny_overrides, tmp_path_factory):
    cfg = compose_config("train", [*tiny_overrides, "data=builtin_wordtree", "model=yolov2_wordtree_cpu",
                                   "model.backbone.depths=[1,1,1,1,1,1]",
                                   f"data.generate.out_dir={tmp_path_factory.mktemp('joint')}"])
    prepare_data(cfg.data)
    return cfg


def test_the_split_holds_the_tree_classes_and_keeps_held_out_boxes_out_of_detection(joint_cfg):
    out = joint_cfg.data.generate.out_dir
    detection = CocoDetection(f"{out}/detection.json", joint_cfg.data.train.image_dir)
    classification = CocoDetection(f"{out}/classification.json", f"{out}/images")
    val = CocoDetection(f"{out}/val.json", joint_cfg.data.val.image_dir)
    names = [*map(str, range(10)), "loops", "no_loops"]
    assert detection.class_names == classification.class_names == val.class_names == names
    held_out = {4, 9}
    det_labels = {int(label) for i in range(len(detection)) for label in detection.targets(i)[1]}
    assert det_labels and not det_labels & held_out
    labels = [classification.image_label(i) for i in range(len(classification))]
    assert len(classification) > 0 and None not in labels and set(labels) <= set(range(10))
    assert all(len(classification.targets(i)[0]) == 0 for i in range(len(classification)))
    assert not set(detection.image_ids) & set(classification.image_ids)
    val_labels = {int(label) for i in range(len(val)) for label in val.targets(i)[1]}
    assert val_labels & held_out  # val keeps every box
    # a classification image's label is one of its digits, a held-out one when it has one
    raw = json.loads(open(joint_cfg.data.generate.ann_file).read())
    digits = {}
    for ann in raw["annotations"]:
        digits.setdefault(ann["image_id"], set()).add(ann["category_id"])
    for i, image_id in enumerate(classification.image_ids):
        present = {classification.category_id_to_label[c] for c in digits[image_id]}
        assert labels[i] in present
        assert (labels[i] in held_out) == bool(present & held_out)


def test_classification_images_are_crops_centred_on_their_labelled_digit(joint_cfg):
    """With crop_context (2 in builtin_wordtree) a classification image is the square around its labelled box,
    twice its longer side (at least 32 px), clipped to the image: pixel for pixel the source's."""
    from PIL import Image

    out, context = joint_cfg.data.generate.out_dir, joint_cfg.data.generate.crop_context
    records = json.loads(open(f"{out}/classification.json").read())["images"]
    raw = json.loads(open(joint_cfg.data.generate.ann_file).read())
    source = {im["id"]: im for im in raw["images"]}
    assert records
    for rec in records:
        x, y, w, h = rec["label_bbox"]
        crop = np.asarray(Image.open(f"{out}/images/{rec['file_name']}").convert("RGB"), dtype=np.float32)
        assert crop.shape[:2] == (rec["height"], rec["width"])
        side = max(context * max(w, h), 32.0)
        full = source[rec["id"]]
        assert rec["width"] <= int(np.ceil(side)) + 1 and rec["height"] <= int(np.ceil(side)) + 1
        assert rec["width"] >= min(w, full["width"] - 1) and rec["height"] >= min(h, full["height"] - 1)
        x0, y0 = max(int(x + w / 2 - side / 2), 0), max(int(y + h / 2 - side / 2), 0)
        original = Image.open(f"{joint_cfg.data.train.image_dir}/{full['file_name']}").convert("RGB")
        expected = np.asarray(original.crop((x0, y0, x0 + rec["width"], y0 + rec["height"])), dtype=np.float32)
        assert np.abs(crop - expected).mean() < 4.0  # the same pixels, through one more JPEG encoding


def test_the_loader_carries_image_label_and_joint_data_needs_mosaic_off(joint_cfg):
    train = raw_dataset(joint_cfg.data, "train")
    with_label = [i for i in range(len(train)) if train.image_label(i) is not None]
    assert with_label and len(with_label) < len(train)
    dataset = build_dataset(joint_cfg.data, "train", joint_cfg.seed)
    _, target = dataset[with_label[0]]
    assert target["image_label"] == train.image_label(with_label[0]) and len(target["boxes"]) == 0
    assert "image_label" not in dataset[0][1]
    images, targets = next(iter(build_data_loader(dataset, joint_cfg.data, train=True, seed=joint_cfg.seed)))
    assert len(targets) == len(images)
    mosaic = joint_cfg.copy()
    mosaic.data.mosaic.prob = 0.5
    with pytest.raises(ConfigError, match="classification_train needs data.mosaic.prob=0"):
        build_dataset(mosaic.data, "train", joint_cfg.seed)


def test_a_classification_label_outside_the_tree_is_a_clear_error(joint_cfg, tmp_path):
    out = joint_cfg.data.generate.out_dir
    data = json.loads(open(f"{out}/classification.json").read())
    data["images"][0]["image_label"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad.json: image id \d+ .* image_label 99, which is not a category id"):
        CocoDetection(bad, f"{out}/images")
    data["images"][0].pop("image_label")
    bad.write_text(json.dumps(data))
    cfg = joint_cfg.copy()
    cfg.data.classification_train = [{"json": str(bad), "images": f"{out}/images"}]
    with pytest.raises(ConfigError, match=r"data.classification_train\[0\]: .*bad.json has 1 images without an "):
        raw_dataset(cfg.data, "train")
