"""VOC and YOLO-txt readers: the same boxes as COCO, VOC's 1-based pixels and difficult flag, and one located
problem per defect (xml file + object ordinal, txt file + line number), raised or dropped with counts."""

import math
import pickle

import numpy as np
import pytest

from detkit.data.coco import CocoDetection
from detkit.data.validation import DatasetError
from detkit.data.voc import VOC_CLASSES, VOCDetection
from detkit.data.yolo_txt import YoloTxtDetection, default_label_dir


def load_all(tmp_path, formats):
    coco = CocoDetection(*formats.write_coco(tmp_path / "coco"))
    voc = VOCDetection(formats.write_voc(tmp_path / "voc"), class_names=formats.CLASSES)
    yolo = YoloTxtDetection(formats.write_yolo(tmp_path / "yolo"), formats.CLASSES)
    return coco, voc, yolo


def test_three_formats_give_identical_pixel_boxes_and_labels(tmp_path, formats):
    datasets = load_all(tmp_path, formats)
    for ds in datasets:
        assert len(ds) == 3 and ds.class_names == formats.CLASSES and ds.num_classes == 3
        names = [im["file_name"].rsplit(".", 1)[0] for im in ds.images]
        for i, name in enumerate(names):
            sample = ds.get_sample(i)  # training targets: no crowd (COCO), no difficult (VOC) boxes
            boxes, labels = sample.boxes, sample.labels
            want_boxes, want_labels = formats.expected(name)
            assert boxes.dtype == np.float32 and labels.dtype == np.int64 and boxes.shape == (len(want_labels), 4)
            np.testing.assert_allclose(boxes, np.array(want_boxes).reshape(-1, 4), atol=1e-3)
            assert labels.tolist() == want_labels
            w, h = formats.IMAGES[name][:2]
            assert sample.image.shape == (h, w, 3) and sample.orig_size == (h, w)
    # Results map back to the same category ids (1..3) in all three.
    assert [d.label_to_category_id for d in datasets] == [[1, 2, 3]] * 3


def test_voc_one_based_coordinates_and_difficult(tmp_path, formats):
    root = formats.write_voc(tmp_path / "voc")
    ds = VOCDetection(root, class_names=formats.CLASSES)
    second = [im["file_name"] for im in ds.images].index("second.jpg")
    assert ds.get_sample(second).boxes.tolist() == [[10, 4, 40, 16]]  # xml says xmin=11 ... xmax=40
    # Evaluation sees every object, with flags aligned (detkit.evaluation.dataset's protocol).
    boxes, labels = ds.annotations(second)
    assert boxes.tolist() == [[10, 4, 40, 16], [0, 0, 5, 5]] and labels.tolist() == [1, 1]
    assert ds.difficult(second).tolist() == [False, True]
    kept = VOCDetection(root, class_names=formats.CLASSES, keep_difficult=True)
    assert len(kept.get_sample(second).boxes) == 2 and len(kept.targets(second)[0]) == 2


def test_voc_default_classes_and_combined_roots(tmp_path, formats):
    images = {"x": (20, 10, [])}
    a = formats.write_voc(tmp_path / "VOC2007", images)
    b = formats.write_voc(tmp_path / "VOC2012", {"y": (20, 10, []), "z": (20, 10, [])}, split="val")
    ds = VOCDetection([a, b], split=["trainval", "val"])
    assert ds.class_names == list(VOC_CLASSES) and len(ds) == 3 and ds.image_ids == [0, 1, 2]
    with pytest.raises(ValueError, match="2 roots but 3 splits"):
        VOCDetection([a, b], split=["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="test.txt does not exist"):
        VOCDetection(a, split="test")


def test_voc_coco_ground_truth_marks_difficult_as_crowd(tmp_path, formats):
    ds = VOCDetection(formats.write_voc(tmp_path / "voc"), class_names=formats.CLASSES)
    gt = ds.coco
    assert sorted(gt.getCatIds()) == [1, 2, 3] and len(gt.getImgIds()) == 3
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[1]))
    assert [(a["bbox"], a["category_id"], a["iscrowd"]) for a in anns] == [
        ([10.0, 4.0, 30.0, 12.0], 2, 0), ([0.0, 0.0, 5.0, 5.0], 2, 1)]


def test_yolo_default_label_dir():
    from pathlib import Path

    assert default_label_dir(Path("/d/images/train")) == Path("/d/labels/train")
    with pytest.raises(ValueError, match="pass label_dir"):
        default_label_dir(Path("/d/pictures"))


def obj(name="a", box=(2, 3, 11, 7), difficult=0):
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>"
            f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")


def voc_with(tmp_path, formats, objects=(), size=(40, 30), xml_text=None, image_size=None):
    """A VOC root whose 'bad' image has ``objects`` (xml snippets) or the raw ``xml_text``; 'first' is valid."""
    root = formats.write_voc(tmp_path / "voc", {"first": formats.IMAGES["first"]})
    formats.write_image(root / "JPEGImages" / "bad.jpg", *(image_size or size))
    text = xml_text or (f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
                        + "".join(objects) + "</annotation>")
    (root / "Annotations" / "bad.xml").write_text(text)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("first\nbad\n")
    return root


# case -> (voc_with kwargs, object ordinal named or None, message part, kind, (images, boxes) left on drop)
VOC_BAD = {
    "unknown class": (dict(objects=[obj(), obj("zebra")]), 2, "unknown class name 'zebra'", "unknown class name",
                      (2, 3)),
    "outside": (dict(objects=[obj(box=(30, 3, 45, 7))]), 1, "extends outside the 40x30 image",
                "box outside the image", (2, 2)),
    "zero width": (dict(objects=[obj(box=(12, 3, 10, 7))]), 1, "has negative width", "zero or negative box size",
                   (2, 2)),
    "nan": (dict(objects=[obj(box=("nan", 3, 10, 7))]), 1, "NaN", "NaN/inf box", (2, 2)),
    "missing coordinate": (dict(objects=["<object><name>a</name><bndbox><xmin>1</xmin></bndbox></object>"]), 1,
                           "lacks a number in ymin, xmax, ymax", "malformed object", (2, 2)),
    "duplicate": (dict(objects=[obj(), obj()]), 2, "duplicate box 'a'", "duplicate box", (2, 3)),
    "malformed xml": (dict(xml_text="<annotation><size>"), None, "malformed XML at line 1", "malformed XML",
                      (1, 2)),
    "size mismatch": (dict(objects=[obj()], image_size=(41, 30)), None, "file is 41x30, annotation says 40x30",
                      "image size mismatch", (1, 2)),
    "no size": (dict(xml_text="<annotation><object><name>a</name></object></annotation>"), None,
                "<size> lacks", "missing or invalid <size>", (1, 2)),
}


@pytest.mark.parametrize("case", sorted(VOC_BAD))
def test_voc_defect_names_xml_file_and_object(tmp_path, formats, case):
    kwargs, ordinal, text, kind, (images_left, boxes_left) = VOC_BAD[case]
    root = voc_with(tmp_path, formats, **kwargs)
    with pytest.raises(DatasetError) as info:
        VOCDetection(root, class_names=formats.CLASSES)
    [problem] = info.value.problems
    assert problem.kind == kind and text in problem.message and problem.image_id == 1
    assert problem.ann_id == ordinal and (f"object {ordinal}" in str(problem)) == (ordinal is not None)
    assert str(problem).startswith("bad.jpg" if kind == "image size mismatch" else "bad.xml")
    with pytest.warns(UserWarning, match=rf"dropped .*for 1 problems \(1 × {kind}\)"):
        ds = VOCDetection(root, class_names=formats.CLASSES, on_invalid="drop")
    assert len(ds) == images_left and sum(len(ds.annotations(i)[0]) for i in range(len(ds))) == boxes_left
    assert ds.problems == info.value.problems


def test_voc_missing_image_and_annotation(tmp_path, formats):
    root = formats.write_voc(tmp_path / "voc")
    (root / "JPEGImages" / "first.jpg").unlink()
    (root / "Annotations" / "empty.xml").unlink()
    with pytest.raises(DatasetError) as info:
        VOCDetection(root, class_names=formats.CLASSES)
    kinds = {p.kind: p for p in info.value.problems}
    assert set(kinds) == {"missing image file", "missing annotation file"}
    assert kinds["missing image file"].file.endswith("first.jpg")
    with pytest.warns(UserWarning, match="dropped 2 of 3 images and 2 of 4 boxes"):
        VOCDetection(root, class_names=formats.CLASSES, on_invalid="drop")


def yolo_with(tmp_path, formats, lines):
    images = formats.write_yolo(tmp_path / "yolo", {"first": formats.IMAGES["first"]})
    (tmp_path / "yolo" / "labels" / "first.txt").write_text("\n".join(lines) + "\n")
    return images


GOOD = "0 0.5 0.5 0.25 0.2"
# case -> (lines, line number named, message part, kind, boxes left on drop)
YOLO_BAD = {
    "unknown class": ([GOOD, "7 0.5 0.5 0.1 0.1"], 2, "unknown class id '7'", "unknown class id", 1),
    "fractional class": (["1.5 0.5 0.5 0.1 0.1", GOOD], 1, "unknown class id", "unknown class id", 1),
    "too few fields": ([GOOD, "", "1 0.5 0.5 0.1"], 3, "expected 'class cx cy w h'", "malformed line", 1),
    "not a number": (["1 0.5 abc 0.1 0.1"], 1, "expected 'class cx cy w h'", "malformed line", 0),
    "nan": ([GOOD, "1 nan 0.5 0.1 0.1"], 2, "NaN", "NaN/inf box", 1),
    "zero height": (["1 0.5 0.5 0.1 0"], 1, "has zero height", "zero or negative box size", 0),
    "outside": (["1 0.95 0.5 0.2 0.2"], 1, "extends outside the 40x30 image", "box outside the image", 0),
    "duplicate": ([GOOD, GOOD], 2, "duplicate box", "duplicate box", 1),
}


@pytest.mark.parametrize("case", sorted(YOLO_BAD))
def test_yolo_defect_names_txt_file_and_line(tmp_path, formats, case):
    lines, number, text, kind, boxes_left = YOLO_BAD[case]
    images = yolo_with(tmp_path, formats, lines)
    with pytest.raises(DatasetError) as info:
        YoloTxtDetection(images, formats.CLASSES)
    [problem] = info.value.problems
    assert problem.kind == kind and text in problem.message and problem.ann_id == number
    assert str(problem).startswith(f"first.txt: image 0 ('first.png'), line {number}: ")
    with pytest.warns(UserWarning, match=rf"dropped 0 of 1 images and .*\(1 × {kind}\)"):
        ds = YoloTxtDetection(images, formats.CLASSES, on_invalid="drop")
    assert len(ds.annotations(0)[0]) == boxes_left


def test_yolo_unreadable_image_is_dropped_with_its_labels(tmp_path, formats):
    images = formats.write_yolo(tmp_path / "yolo")
    (images / "first.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"first\.png: image 1 \('first\.png'\): image file unreadable"):
        YoloTxtDetection(images, formats.CLASSES)
    with pytest.warns(UserWarning, match="dropped 1 of 3 images and 2 of 3 boxes"):
        ds = YoloTxtDetection(images, formats.CLASSES, on_invalid="drop")
    assert [im["file_name"] for im in ds.images] == ["empty.png", "second.png"] and ds.image_ids == [0, 2]


def test_reader_errors_pickle_and_load_image_after_change(tmp_path, formats):
    _, voc, yolo = load_all(tmp_path, formats)
    (tmp_path / "voc" / "JPEGImages" / "first.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="image file unreadable") as info:
        voc.load_image(0)
    assert pickle.loads(pickle.dumps(info.value)).problems == info.value.problems
    assert pickle.loads(pickle.dumps(yolo)).annotations(2)[1].tolist() == [1]  # sorted: empty, first, second
    assert not math.isnan(float(yolo.annotations(0)[0].sum()))


def test_voc_meets_the_evaluation_protocol(tmp_path, formats):
    evaluation = pytest.importorskip("detkit.evaluation.dataset")
    ds = VOCDetection(formats.write_voc(tmp_path / "voc"), class_names=formats.CLASSES)
    assert isinstance(ds, evaluation.EvaluableDataset)
    truth = evaluation.dataset_ground_truth(ds)
    assert [t.difficult.tolist() for t in truth] == [[False, False], [False, True], []]
