"""COCO reader: category mapping, box conversion, image loading, and one clear error per kind of bad input."""

import copy
import json
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from detkit.data.coco import CocoDetection, DatasetError, Problem, load_coco_json, validate_coco

SIZES = {"0.png": (40, 30), "1.jpg": (50, 20)}  # file name -> (width, height)


def write_images(root, sizes=SIZES):
    images = root / "images"
    images.mkdir(exist_ok=True)
    for i, (name, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(np.full((h, w, 3), 60 * (i + 1), dtype=np.uint8)).save(images / name)
    return images


def write_dataset(root, data: dict):
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, write_images(root)


def valid() -> dict:
    """Two images, category ids 3/7/42 listed out of order, one crowd box."""
    return {
        "images": [{"id": 10, "file_name": "0.png", "width": 40, "height": 30},
                   {"id": 20, "file_name": "1.jpg", "width": 50, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 42, "bbox": [1.0, 2.0, 10.0, 5.0]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20.0, 10.0, 19.5, 20.0]},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "iscrowd": 1},
            {"id": 4, "image_id": 20, "category_id": 7, "bbox": [10, 4, 30, 12]},
        ],
        "categories": [{"id": 42, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }


def test_non_contiguous_category_ids_map_to_sorted_labels_and_back(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path, valid()))
    assert ds.category_ids == [3, 7, 42] and ds.num_classes == 3
    assert ds.class_names == ["a", "b", "c"]
    assert ds.category_id_to_label == {3: 0, 7: 1, 42: 2}
    assert [ds.label_to_category_id[ds.category_id_to_label[c]] for c in (3, 7, 42)] == [3, 7, 42]
    assert ds.image_ids == [10, 20] and len(ds) == 2


def test_xywh_becomes_xyxy_and_crowd_stays_only_in_the_coco_ground_truth(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    ds = CocoDetection(ann, images)
    boxes, labels = ds.annotations(0)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    assert boxes.tolist() == [[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 39.5, 30.0]]
    assert labels.tolist() == [2, 0]
    boxes, labels = ds.annotations(1)
    assert boxes.tolist() == [[10.0, 4.0, 40.0, 16.0]] and labels.tolist() == [1]  # crowd box 3 excluded
    ann.unlink()  # the ground truth is built from memory, not re-read
    gt = ds.coco
    assert gt is ds.coco
    assert sorted(gt.getAnnIds(imgIds=[20])) == [3, 4]
    assert gt.loadAnns([3])[0]["iscrowd"] == 1 and gt.loadAnns([4])[0]["area"] == 360
    assert sorted(gt.getCatIds()) == [3, 7, 42]
    sample = ds.get_sample(1)
    assert sample.image.shape == (20, 50, 3) and sample.image.dtype == np.uint8
    assert sample.orig_size == (20, 50) and sample.image_id == 20


def test_boxes_within_one_pixel_of_the_border_are_clipped_everywhere(tmp_path):
    data = valid()
    data["annotations"][1]["bbox"] = [-0.5, 10.0, 40.9, 20.6]
    ds = CocoDetection(*write_dataset(tmp_path, data))
    assert ds.annotations(0)[0][1].tolist() == [0.0, 10.0, 40.0, 30.0]
    assert ds.coco.loadAnns([2])[0]["bbox"] == [0, 10.0, 40, 20.0]


def test_images_without_annotations_are_kept(tmp_path):
    data = valid()
    data["annotations"] = data["annotations"][:2]
    ds = CocoDetection(*write_dataset(tmp_path, data))
    assert len(ds) == 2 and ds.annotations(1)[0].shape == (0, 4) and ds.annotations(1)[1].shape == (0,)


def corrupt_png(tmp_path, data):
    data["images"][0]["file_name"] = "bad.png"
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


# case -> (corrupt(tmp_path, data), image id named, annotation id named or None, message part, kind,
#          (images, training boxes) left in drop mode)
BAD_INPUTS = {
    "missing image": (lambda p, d: d["images"][1].update(file_name="gone.jpg"), 20, None,
                      "image file missing", "missing image file", (1, 2)),
    "corrupt image": (corrupt_png, 10, None, "image file unreadable", "unreadable image", (1, 1)),
    "size mismatch": (lambda p, d: d["images"][0].update(width=41), 10, None,
                      "file is 40x30, annotation says 41x30", "image size mismatch", (1, 1)),
    "outside": (lambda p, d: d["annotations"][0].update(bbox=[35.0, 2.0, 10.0, 5.0]), 10, 1,
                "extends outside the 40x30 image", "box outside the image", (2, 2)),
    "zero width": (lambda p, d: d["annotations"][0].update(bbox=[10.0, 5.0, 0.0, 7.0]), 10, 1,
                   "box [10.0, 5.0, 0.0, 7.0] has zero width", "zero or negative box size", (2, 2)),
    "unknown category": (lambda p, d: d["annotations"][0].update(category_id=99), 10, 1,
                         "unknown category id 99", "unknown category id", (2, 2)),
    "nan": (lambda p, d: d["annotations"][0].update(bbox=[1.0, math.nan, 3.0, 3.0]), 10, 1,
            "NaN or infinite", "NaN/inf box", (2, 2)),
    "duplicate box": (lambda p, d: d["annotations"].append({**d["annotations"][0], "id": 9}), 10, 9,
                      "duplicate box", "duplicate box", (2, 3)),
    "unknown image": (lambda p, d: d["annotations"][0].update(image_id=77), 77, 1,
                      "not in 'images'", "unknown image id", (2, 2)),
    "duplicate annotation id": (lambda p, d: d["annotations"][3].update(id=1), 20, 1,
                                "duplicate annotation id", "duplicate annotation id", (2, 2)),
    "missing key": (lambda p, d: d["annotations"][0].pop("bbox"), 10, 1, "lacks bbox",
                    "incomplete annotation record", (2, 2)),
}


def corrupted(tmp_path, case):
    data = copy.deepcopy(valid())
    BAD_INPUTS[case][0](tmp_path, data)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    write_images(tmp_path)
    return ann, tmp_path / "images"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_naming_file_image_annotation_and_problem(tmp_path, case):
    _, image_id, ann_id, text, kind, _ = BAD_INPUTS[case]
    with pytest.raises(DatasetError) as info:
        CocoDetection(*corrupted(tmp_path, case))
    message = str(info.value)
    assert message.startswith(f"1 problem in {tmp_path / 'ann.json'} (1 kind: 1 × {kind})")
    assert f"image {image_id}" in message and text in message
    assert (f"annotation {ann_id}" in message) == (ann_id is not None)
    [problem] = info.value.problems
    assert (problem.image_id, problem.ann_id, problem.kind) == (image_id, ann_id, kind)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_drop_mode_drops_the_invalid_counts_it_and_keeps_the_rest(tmp_path, case):
    kind, (images_left, boxes_left) = BAD_INPUTS[case][4:]
    with pytest.warns(UserWarning, match=rf"dropped .*\(1 × {kind}\)"):
        ds = CocoDetection(*corrupted(tmp_path, case), on_invalid="drop")
    assert len(ds) == images_left
    assert sum(len(ds.annotations(i)[0]) for i in range(len(ds))) == boxes_left
    assert all(ds.load_image(i).ndim == 3 for i in range(len(ds)))


def test_drop_warning_counts_annotations_lost_with_their_image(tmp_path):
    with pytest.warns(UserWarning, match="dropped 1 of 2 images and 2 of 4 annotations"):
        CocoDetection(*corrupted(tmp_path, "missing image"), on_invalid="drop")


def test_malformed_json_names_file_line_and_column(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    ann.write_text('{"images": [\n  {"id": 1,, "file_name": "0.png"}\n]}')
    with pytest.raises(DatasetError, match=r"ann\.json: malformed JSON at line 2 column 12") as info:
        CocoDetection(ann, images)
    message = str(info.value)
    assert str(tmp_path / "ann.json") in message and '{"id": 1,,' in message and "on_invalid" not in message


def test_missing_top_level_key_or_wrong_type_is_an_error(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": {}, "annotations": []}))
    with pytest.raises(DatasetError, match="'images' is missing or not a list") as info:
        load_coco_json(ann)
    assert "'categories' is missing" in str(info.value) and len(info.value.problems) == 2
    ann.write_text("[]")
    with pytest.raises(DatasetError, match="top level is a JSON list"):
        load_coco_json(ann)


def test_many_problems_are_summarised_by_kind_and_truncated(tmp_path):
    data = valid()
    data["annotations"] += [{"id": 100 + i, "image_id": 10, "category_id": 3, "bbox": [1, 1, 0, 1]}
                            for i in range(24)]
    data["images"][1]["file_name"] = "gone.jpg"
    with pytest.raises(DatasetError) as info:
        CocoDetection(*write_dataset(tmp_path, data))
    lines = str(info.value).splitlines()
    assert lines[0] == (f"25 problems in {tmp_path / 'ann.json'} "
                        "(2 kinds: 24 × zero or negative box size, 1 × missing image file)")
    assert "  ... and 5 more" in lines and len(info.value.problems) == 25
    assert pickle.loads(pickle.dumps(info.value)).problems == info.value.problems


def test_validate_coco_lists_problems_without_raising(tmp_path):
    ann, images = corrupted(tmp_path, "missing image")
    data = load_coco_json(ann)
    [problem] = validate_coco(data, ann, images)
    assert problem.file == str(images / "gone.jpg")  # image-file problems name the image file
    assert validate_coco(data, ann, images, check_images=False) == []
    assert str(Problem("a/instances_val.json", 12, 345, "box [10.0, 5.0, 0.0, 7.0] has zero width",
                       "000011.jpg")) == ("instances_val.json: image 12 ('000011.jpg'), annotation 345: "
                                          "box [10.0, 5.0, 0.0, 7.0] has zero width")


def test_truncated_jpeg_is_unreadable_but_trailing_bytes_are_fine(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    jpeg = (images / "1.jpg").read_bytes()
    (images / "1.jpg").write_bytes(jpeg + b"\0" * 3000)  # padding after the end marker
    CocoDetection(ann, images)
    (images / "1.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    with pytest.raises(DatasetError, match=r"image 20 \('1.jpg'\): image file unreadable"):
        CocoDetection(ann, images)


def test_unknown_on_invalid_value_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"on_invalid must be one of \('error', 'drop'\), got 'ignore'"):
        CocoDetection(*write_dataset(tmp_path, valid()), on_invalid="ignore")


def test_image_unreadable_after_validation_names_file_and_image(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path, valid()))
    (tmp_path / "images" / "1.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"1\.jpg: image 20 \('1\.jpg'\): image file unreadable"):
        ds.load_image(1)


def test_grayscale_rgba_load_as_rgb_and_exif_orientation_is_ignored(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    Image.fromarray(np.full((30, 40), 7, dtype=np.uint8)).save(images / "0.png")
    gray = CocoDetection(ann, images).load_image(0)
    assert gray.shape == (30, 40, 3) and gray.dtype == np.uint8 and (gray == 7).all()
    Image.fromarray(np.full((30, 40, 4), (10, 20, 30, 0), dtype=np.uint8)).save(images / "0.png")
    assert CocoDetection(ann, images).load_image(0)[0, 0].tolist() == [10, 20, 30]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display": COCO boxes refer to the stored pixels
    Image.fromarray(np.zeros((20, 50, 3), dtype=np.uint8)).save(images / "1.jpg", exif=exif)
    assert CocoDetection(ann, images).load_image(1).shape == (20, 50, 3)


def test_transforms_get_sample_and_index_and_the_epoch(tmp_path):
    class Recorder:
        epoch = None

        def __call__(self, sample, index):
            return sample.image_id, index

        def set_epoch(self, epoch):
            self.epoch = epoch

    transforms = Recorder()
    ds = CocoDetection(*write_dataset(tmp_path, valid()), transforms=transforms)
    assert ds[1] == (20, 1)
    ds.set_epoch(3)
    assert transforms.epoch == 3
