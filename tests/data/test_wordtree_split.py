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
    # no detection image shows a held-out digit, not even unlabelled (it would be taught as background)
    for image_id in detection.image_ids:
        assert not {detection.category_id_to_label[c] for c in digits.get(image_id, ())} & held_out


@pytest.mark.parametrize("keep_scale", [False, True])
def test_classification_images_are_crops_centred_on_their_labelled_digit(joint_cfg, tmp_path, keep_scale):
    """With crop_context (2 in builtin_wordtree) a classification image is the square around its labelled box,
    twice its longer side (at least 32 px), clipped to the image: pixel for pixel the source's. With
    crop_keep_scale (builtin_wordtree's) that square stays in place on a grey canvas of the source's size."""
    from PIL import Image

    from detkit.data.transforms import PAD_VALUE
    from detkit.data.wordtree_split import ensure_joint_split

    gen, context = joint_cfg.data.generate, joint_cfg.data.generate.crop_context
    out = ensure_joint_split(gen.ann_file, gen.val_ann_file, tmp_path / "split", gen.internal_nodes,
                             gen.classification_only, gen.classification_fraction, gen.seed, gen.image_dir,
                             context, crop_keep_scale=keep_scale)
    records = json.loads(open(f"{out}/classification.json").read())["images"]
    raw = json.loads(open(gen.ann_file).read())
    source = {im["id"]: im for im in raw["images"]}
    assert records
    for rec in records:
        x, y, w, h = rec["label_bbox"]
        crop = np.asarray(Image.open(f"{out}/images/{rec['file_name']}").convert("RGB"), dtype=np.float32)
        assert crop.shape[:2] == (rec["height"], rec["width"])
        side = max(context * max(w, h), 32.0)
        full = source[rec["id"]]
        x0, y0 = max(int(x + w / 2 - side / 2), 0), max(int(y + h / 2 - side / 2), 0)
        x1 = min(int(np.ceil(x + w / 2 + side / 2)), full["width"])
        y1 = min(int(np.ceil(y + h / 2 + side / 2)), full["height"])
        original = Image.open(f"{joint_cfg.data.train.image_dir}/{full['file_name']}").convert("RGB")
        expected = np.asarray(original.crop((x0, y0, x1, y1)), dtype=np.float32)
        if keep_scale:
            assert (rec["width"], rec["height"]) == (full["width"], full["height"])
            inside, expected = crop[y0 + 8 : y1 - 8, x0 + 8 : x1 - 8], expected[8:-8, 8:-8]  # JPEG blurs edges
            outside = crop.copy()
            outside[y0:y1, x0:x1] = PAD_VALUE
            assert np.abs(outside - PAD_VALUE).mean() < 2.0  # grey around, up to JPEG's ringing at the edges
        else:
            assert (rec["width"], rec["height"]) == (x1 - x0, y1 - y0)
            inside = crop
        assert np.abs(inside - expected).mean() < 4.0  # the same pixels, through one more JPEG encoding


def test_the_loader_carries_image_label_and_mosaic_leaves_classification_images_whole(joint_cfg):
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
    mosaic.data.mosaic.prob = 1.0
    tiled = build_dataset(mosaic.data, "train", joint_cfg.seed)
    for i in range(len(train)):
        _, target = tiled[i]
        if i in with_label:  # passed through whole, with its label
            assert target["image_label"] == train.image_label(i) and len(target["boxes"]) == 0
        else:  # a mosaic of detection images only
            assert "image_label" not in target
    with pytest.raises(ConfigError, match="classification_train cannot be combined with data.proposals_file"):
        proposals = joint_cfg.copy()
        proposals.data.proposals_file = "proposals.pkl"
        build_dataset(proposals.data, "train", joint_cfg.seed)


def test_classification_images_are_drawn_first_among_those_showing_a_held_out_class():
    """The fraction of the images with objects drawn as classification images comes first from the images that
    show a held-out class, then from the others; one showing it and not drawn is no detection image."""
    from detkit.data.wordtree_split import split_joint

    # image i shows digit i % 4 (and image 0 also a 3): held-out "1" is shown by images 1, 5 and 9
    categories = [{"id": c + 1, "name": str(c)} for c in range(4)]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in range(12)]
    annotations = [{"id": i, "image_id": i, "category_id": i % 4 + 1, "bbox": [1, 1, 10, 10]} for i in range(12)]
    annotations.append({"id": 99, "image_id": 0, "category_id": 4, "bbox": [20, 20, 30, 30]})
    train = {"categories": categories, "images": images, "annotations": annotations}
    detection, classification = split_joint(train, ["top"], ["1"], classification_fraction=0.1)
    chosen = {im["id"] for im in classification["images"]}
    assert len(chosen) == 1 and chosen <= {1, 5, 9}  # 0.1 of 12: one of them; the other two are left out
    assert {im["image_label"] for im in classification["images"]} == {2}
    assert {im["id"] for im in detection["images"]} == {0, 2, 3, 4, 6, 7, 8, 10, 11}
    assert {a["image_id"] for a in detection["annotations"]} == {0, 2, 3, 4, 6, 7, 8, 10, 11}
    detection, classification = split_joint(train, ["top"], ["1"], classification_fraction=0.5, seed=4)
    chosen = {im["id"] for im in classification["images"]}
    assert len(chosen) == 6 and {1, 5, 9} <= chosen  # all three, then three others
    assert {im["id"] for im in detection["images"]} == set(range(12)) - chosen
    assert split_joint(train, ["top"], ["1"], 0.5, seed=4) == (detection, classification)  # seeded
    with pytest.raises(ConfigError, match="no detection image is left: 12 of the 12 training images show one of"):
        split_joint(train, ["top"], ["0", "1", "2", "3"], 0.5)


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


def test_crop_settings_that_cannot_work_are_clear_errors(tmp_path):
    from detkit.data.wordtree_split import crop_classification_images, ensure_joint_split

    record = {"id": 1, "file_name": "1.jpg", "width": 64, "height": 64, "image_label": 1, "label_bbox": [1, 1, 9, 9]}
    with pytest.raises(ConfigError, match=r"crop_context must be >= 1 \(the crop holds the labelled box\), got 0.5"):
        crop_classification_images({"images": [record]}, tmp_path, tmp_path / "crops", 0.5)
    with pytest.raises(ConfigError, match="crop_context needs data.generate.image_dir"):
        ensure_joint_split(tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out", ["top"], ["1"],
                           crop_context=2.0)
