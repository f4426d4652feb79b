"""COCO reader: category mapping, box conversion, and one clear error per kind of bad input."""

import copy
import json
import math

import numpy as np
import pytest
from PIL import Image

from detkit.data.coco import CocoDetection, DatasetError


def write_dataset(root, data: dict, sizes=((40, 30), (50, 20))):
    images = root / "images"
    images.mkdir(exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 60 * i, dtype=np.uint8)).save(images / f"{i}.png")
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


def valid() -> dict:
    return {
        "images": [{"id": 10, "file_name": "0.png", "width": 40, "height": 30},
                   {"id": 20, "file_name": "1.png", "width": 50, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 42, "bbox": [1.0, 2.0, 10.0, 5.0]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20.0, 10.0, 19.5, 20.0]},
            {"id": 3, "image_id": 20, "category_id": 7, "bbox": [0.0, 0.0, 5.0, 5.0], "iscrowd": 1},
        ],
        "categories": [{"id": 42, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }


def test_non_contiguous_category_ids_map_to_sorted_labels_and_back(tmp_path):
    ds = CocoDetection(*write_dataset(tmp_path, valid()))
    assert ds.category_ids == [3, 7, 42] and ds.class_names == ["a", "b", "c"]
    assert [ds.label_to_category_id[ds.category_id_to_label[c]] for c in (3, 7, 42)] == [3, 7, 42]
    boxes, labels = ds.annotations(0)
    assert labels.tolist() == [2, 0]
    assert boxes.tolist() == [[1.0, 2.0, 11.0, 7.0], [20.0, 10.0, 39.5, 30.0]]  # xywh -> xyxy
    # Crowd boxes are not training targets but stay in the evaluation ground truth.
    assert len(ds.annotations(1)[0]) == 0
    assert len(ds.coco.getAnnIds(imgIds=[20])) == 1
    sample = ds.get_sample(1)
    assert sample.image.shape == (20, 50, 3) and sample.orig_size == (20, 50) and sample.image_id == 20


def test_box_within_one_pixel_of_the_border_is_clipped_not_rejected(tmp_path):
    data = valid()
    data["annotations"][1]["bbox"] = [20.0, 10.0, 20.6, 20.4]
    ds = CocoDetection(*write_dataset(tmp_path, data))
    assert ds.annotations(0)[0][1].tolist() == [20.0, 10.0, 40.0, 30.0]


BAD_INPUTS = {
    "missing image": (lambda d: d["images"][1].update(file_name="gone.png"), "image 20", None, "image file missing"),
    "outside": (lambda d: d["annotations"][0].update(bbox=[35.0, 2.0, 10.0, 5.0]), "image 10", 1,
                "extends outside the 40x30 image"),
    "zero width": (lambda d: d["annotations"][0].update(bbox=[1.0, 2.0, 0.0, 5.0]), "image 10", 1, "zero width"),
    "unknown category": (lambda d: d["annotations"][0].update(category_id=99), "image 10", 1,
                         "unknown category id 99"),
    "nan": (lambda d: d["annotations"][0].update(bbox=[1.0, math.nan, 3.0, 3.0]), "image 10", 1, "NaN"),
    "duplicate": (lambda d: d["annotations"].append({**d["annotations"][0], "id": 9}), "image 10", 9,
                  "duplicate box"),
    "size mismatch": (lambda d: d["images"][0].update(width=41), "image 10", None, "size mismatch"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=77), "image 77", 1, "not in 'images'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_error_naming_file_image_annotation(tmp_path, case):
    corrupt, image, ann_id, problem = BAD_INPUTS[case]
    data = copy.deepcopy(valid())
    corrupt(data)
    ann, images = write_dataset(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        CocoDetection(ann, images)
    message = str(info.value)
    assert "ann.json" in message and image in message and problem in message
    if ann_id is not None:
        assert f"annotation {ann_id}" in message
    assert len(info.value.problems) == 1


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_drop_mode_keeps_the_valid_records_and_counts_the_rest(tmp_path, case):
    corrupt = BAD_INPUTS[case][0]
    data = copy.deepcopy(valid())
    corrupt(data)
    with pytest.warns(UserWarning, match="dropped"):
        ds = CocoDetection(*write_dataset(tmp_path, data), on_invalid="drop")
    total = sum(len(ds.annotations(i)[0]) for i in range(len(ds)))
    # Image-level problems drop the image and its boxes; box-level problems drop only that box.
    images_left, boxes_left = {"missing image": (1, 2), "size mismatch": (1, 0), "duplicate": (2, 2)}.get(case, (2, 1))
    assert (len(ds), total) == (images_left, boxes_left)


def test_malformed_json_names_file_line_and_column(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    ann.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match=r"ann.json.*malformed JSON.*line 2 column"):
        CocoDetection(ann, images)


def test_corrupt_image_bytes_and_wrong_on_invalid_value(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    (images / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DatasetError, match=r"image 20 \('1.png'\).*unreadable"):
        CocoDetection(ann, images)
    with pytest.raises(ValueError, match="on_invalid"):
        CocoDetection(ann, images, on_invalid="ignore")


def test_grayscale_images_load_as_rgb(tmp_path):
    ann, images = write_dataset(tmp_path, valid())
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(images / "0.png")
    assert CocoDetection(ann, images).load_image(0).shape == (30, 40, 3)
