"""Data Distillation (detkit/app/data_distillation.py, tools/distill_data.py): the auto threshold matches the
labelled set's boxes per image, and the tool writes a COCO json of the teacher's categories that training reads
next to the labelled set."""

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO

from detkit.app.build import build_dataset
from detkit.app.data_distillation import (
    auto_score_threshold,
    boxes_per_image,
    distill_data,
    image_records,
    pseudo_coco,
)
from detkit.app.train import train
from detkit.data.coco import CocoDetection
from detkit.data.labelled_split import split_labelled
from tests.conftest import compose_config


def test_auto_threshold_keeps_the_wanted_boxes_per_image():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.7, 0.6, 0.5, 0.4, 0.2])  # 4 images' candidates, in any order
    threshold = auto_score_threshold(scores, num_images=4, per_image=1.5)
    assert threshold == pytest.approx(0.4) and int((scores >= threshold).sum()) == 6
    assert auto_score_threshold(scores, 4, per_image=5.0) == pytest.approx(0.2)  # too few candidates: keep all
    assert auto_score_threshold(scores, 4, per_image=0.0) == float("inf")


def test_auto_threshold_gives_the_labelled_data_average(tiny_builtin):
    labelled = CocoDetection(tiny_builtin / "annotations" / "instances_train.json", tiny_builtin / "images" / "train")
    raw = json.loads(labelled.ann_file.read_text())
    average = boxes_per_image(labelled)
    assert average == len(raw["annotations"]) / len(raw["images"])
    # as many unlabelled images as labelled ones, 10 candidate boxes each with distinct scores
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[2.0 * k, 2.0 * k, 2.0 * k + 9, 2.0 * k + 9] for k in range(10)])
    detections = [((100, 100), {"boxes": boxes, "scores": torch.rand(10, generator=generator),
                                "labels": torch.arange(10)}) for _ in raw["images"]]
    scores = torch.cat([det["scores"] for _, det in detections])
    threshold = auto_score_threshold(scores, len(detections), average)
    records = [{"id": i + 1, "file_name": f"{i}.jpg"} for i in range(len(detections))]
    coco = pseudo_coco(records, detections, threshold, labelled.class_names, labelled.label_to_category_id,
                       keep_empty=True)
    assert len(coco["annotations"]) / len(coco["images"]) == average
    assert min(a["score"] for a in coco["annotations"]) >= round(threshold, 4)


def test_tool_writes_the_teachers_pseudo_labels_and_training_reads_them(tiny_train_config, tiny_builtin, tmp_path):
    train(tiny_train_config("trainer.epochs=1", "trainer.eval_every=9"), tmp_path / "teacher")
    unlabelled, out = tiny_builtin / "images" / "val", tmp_path / "pseudo" / "pseudo.json"
    # what tools/distill_data.py runs, with its config (in-process: a subprocess spends its time importing)
    cfg = compose_config("distill_data", [f"teacher={tmp_path / 'teacher' / 'last.pt'}", f"images={unlabelled}",
                                          f"out={out}", "score_thresh=auto", "scales=[0.75]", "flip=true"])
    summary = distill_data(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        pseudo = COCO(str(out))
    written = json.loads(out.read_text())
    labelled = json.loads((tiny_builtin / "annotations" / "instances_train.json").read_text())
    assert [(c["id"], c["name"]) for c in written["categories"]] == \
        [(c["id"], c["name"]) for c in sorted(labelled["categories"], key=lambda c: c["id"])]
    # auto: as many boxes per unlabelled image (8 of them) as the labelled images have
    wanted = round(len(labelled["annotations"]) / len(labelled["images"]) * 8)
    assert len(pseudo.getAnnIds()) == wanted == summary["boxes"] and written["info"]["flip"] is True
    assert all(a["score"] >= written["info"]["score_thresh"] - 1e-4 for a in written["annotations"])
    # the student's training set: the 24 labelled images followed by the pseudo-labelled ones
    student = tiny_train_config(f"data.extra_train=[{{json: {out}, images: {unlabelled}}}]", "data.mosaic.prob=0")
    dataset = build_dataset(student.data, "train", seed=0)
    assert len(dataset) == 24 + len(written["images"])
    image, target = dataset[len(dataset) - 1]
    assert image.shape == (3, 96, 96) and len(target["boxes"]) == len(pseudo.getAnnIds(written["images"][-1]["id"]))


def test_images_json_chooses_which_images_of_the_folder_to_label(tiny_builtin, tmp_path):
    data = json.loads((tiny_builtin / "annotations" / "instances_train.json").read_text())
    unlabelled = split_labelled(data, 10, seed=0)[1]
    listing = tmp_path / "unlabelled.json"
    listing.write_text(json.dumps(unlabelled))
    records = image_records(tiny_builtin / "images" / "train", listing)
    assert [record for _, record in records] == [{"id": im["id"], "file_name": im["file_name"]}
                                                 for im in unlabelled["images"]]
    assert all(path.is_file() for path, _ in records) and len(records) == 14
    with pytest.raises(FileNotFoundError, match=r"images that .*unlabelled\.json lists are not in .*val"):
        image_records(tiny_builtin / "images" / "val", listing)  # 8 images: most listed files are not there
