import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from benchmarks.peer_benchmark import format_peer_table, peer_predictions_to_coco, write_yolo_layout
from detkit.data.coco import CocoDetection
from detkit.data.yolo_txt import YoloTxtDetection


def test_the_yolo_layout_holds_the_same_boxes_and_classes_as_the_coco_json(tiny_builtin, tmp_path):
    ann = tiny_builtin / "annotations" / "instances_val.json"
    images = write_yolo_layout(ann, tiny_builtin / "images" / "val", tmp_path, "val")
    coco = CocoDetection(ann, tiny_builtin / "images" / "val")
    yolo = YoloTxtDetection(images, coco.class_names)
    assert len(yolo) == len(coco) > 0
    position = {Path(im["file_name"]).name: j for j, im in enumerate(yolo.images)}
    for i, image in enumerate(coco.images):
        a, b = coco.get_sample(i), yolo.get_sample(position[Path(image["file_name"]).name])
        assert torch.equal(torch.as_tensor(a.labels), torch.as_tensor(b.labels))
        assert torch.allclose(torch.as_tensor(a.boxes), torch.as_tensor(b.boxes), atol=0.01)


def test_peer_predictions_get_the_jsons_image_and_category_ids(tiny_builtin):
    ann = tiny_builtin / "annotations" / "instances_val.json"
    coco = COCO(str(ann))
    image_id = sorted(coco.getImgIds())[3]
    name = coco.imgs[image_id]["file_name"].split("/")[-1]
    gt = coco.imgToAnns[image_id][0]
    x, y, w, h = gt["bbox"]
    cls = sorted(coco.getCatIds()).index(gt["category_id"])
    results = peer_predictions_to_coco([{"file": name, "boxes": [[x, y, x + w, y + h]], "scores": [0.9],
                                         "classes": [cls]}], ann)
    assert results == [{"image_id": image_id, "category_id": gt["category_id"], "bbox": [x, y, w, h],
                        "score": 0.9}]
    with pytest.raises(ValueError, match="not an image of"):
        peer_predictions_to_coco([{"file": "nope.jpg", "boxes": [], "scores": [], "classes": []}], ann)


def test_the_table_states_the_budget_and_the_ap_ratio():
    rows = [{"name": "detkit A", "epochs": 5.0, "wall_s": 300, "img_s": 80.0, "AP": 0.44, "AP50": 0.81,
             "params": 1.7e6, "flops": 1.26e9},
            {"name": "ultralytics yolov8n", "epochs": 3, "wall_s": 301, "img_s": 40.0, "AP": 0.22, "AP50": 0.4,
             "params": 3.0e6, "flops": 3.6e9}]
    table = format_peer_table(rows, 5, 384)
    assert "budget 5 min" in table and "| detkit A | 5.00 | 300 | 80.0 | 0.4400 |" in table
    assert "2.00x" in table
    json.dumps(rows)
