"""VOC AP on cases small enough to work out by hand; the arithmetic is in the comments."""

import numpy as np
import pytest
import torch

from detkit.evaluation.dataset import align_predictions, dataset_ground_truth, evaluate_dataset
from detkit.evaluation.voc import (
    ImageGroundTruth,
    average_precision,
    box_iou_numpy,
    evaluate_voc,
    format_voc_table,
    match_class,
)


def gt(boxes, labels, difficult=None) -> ImageGroundTruth:
    boxes = np.array(boxes, np.float64).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.array(difficult, bool)
    return ImageGroundTruth(boxes, np.array(labels, np.int64), difficult)


def det(boxes, scores, labels) -> dict:
    return {"boxes": np.array(boxes, np.float64).reshape(-1, 4), "scores": np.array(scores, np.float64),
            "labels": np.array(labels, np.int64)}


A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
FAR = [100, 100, 110, 110]
D = [60, 0, 70, 10]  # the difficult one


def three_gts_four_dets():
    # Scores 0.9 on A (TP), 0.8 on A again (duplicate: FP), 0.7 on B (TP), 0.6 on nothing (FP); C is missed.
    # Cumulative TP 1,1,2,2 and FP 0,1,1,2 over 3 positives:
    #   precision 1, 1/2, 2/3, 1/2      recall 1/3, 1/3, 2/3, 2/3
    return [gt([A, B, C], [0, 0, 0])], [det([A, A, B, FAR], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])]


def test_precision_recall_and_both_ap_by_hand():
    truth, dets = three_gts_four_dets()
    tp, fp, positives = match_class([truth[0].boxes], [truth[0].difficult], [dets[0]["boxes"]], [dets[0]["scores"]])
    assert tp.tolist() == [True, False, True, False] and fp.tolist() == [False, True, False, True]
    assert positives == 3
    area = evaluate_voc(truth, dets, num_classes=1, metric="voc12")
    recall, precision = area["pr_curves"]["0"]
    np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # Area: the envelope is 1 up to recall 1/3, 2/3 up to recall 2/3, 0 beyond (recall 1 is never reached):
    #   1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9
    assert area["mAP"] == pytest.approx(5 / 9) and area["AP50"] == pytest.approx(5 / 9)
    # 11-point: recall levels 0, .1, .2, .3 (<= 1/3) reach precision 1; .4, .5, .6 (<= 2/3) reach at most 2/3;
    # .7 ... 1.0 are never reached: (4 * 1 + 3 * 2/3 + 4 * 0) / 11 = 6/11
    eleven = evaluate_voc(truth, dets, num_classes=1, metric="voc07")
    assert eleven["mAP"] == pytest.approx(6 / 11)
    assert "VOC2007 11-point" in format_voc_table(eleven)


def test_average_precision_directly():
    assert average_precision(np.array([1.0]), np.array([1.0]), "voc12") == pytest.approx(1.0)
    assert average_precision(np.array([1.0]), np.array([1.0]), "voc07") == pytest.approx(1.0)
    # One TP at recall 1/2 and precision 1: area 1/2; 11-point levels 0 ... .5 (6 of 11) reach 1 → 6/11.
    assert average_precision(np.array([0.5]), np.array([1.0]), "voc12") == pytest.approx(0.5)
    assert average_precision(np.array([0.5]), np.array([1.0]), "voc07") == pytest.approx(6 / 11)
    assert average_precision(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="voc07"):
        average_precision(np.array([1.0]), np.array([1.0]), "voc2007")


def test_difficult_ground_truth_is_ignored():
    truth, dets = three_gts_four_dets()
    # Add a difficult object D with two detections on it, one scoring above everything: both are neither TP
    # nor FP, and D does not count in recall, so every number stays as above.
    hard_truth = [gt([A, B, C, D], [0, 0, 0, 0], [False, False, False, True])]
    hard_dets = [det([D, A, A, B, FAR, D], [0.95, 0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 0, 0, 0, 0])]
    for metric in ("voc07", "voc12"):
        assert evaluate_voc(hard_truth, hard_dets, 1, metric)["mAP"] == pytest.approx(
            evaluate_voc(truth, dets, 1, metric)["mAP"])
    tp, fp, positives = match_class([hard_truth[0].boxes], [hard_truth[0].difficult], [hard_dets[0]["boxes"]],
                                    [hard_dets[0]["scores"]])
    assert positives == 3 and len(tp) == len(fp) == 4


def test_map_averages_only_classes_with_positives_across_images():
    # Class 0 as above (5/9) in image 0; class 1: one GT in image 1 found by its only detection (AP 1);
    # class 2: only a difficult GT (no positives) and a detection → left out of the mean;
    # class 3: neither GT nor detections → left out. mAP = (5/9 + 1) / 2.
    truth, dets = three_gts_four_dets()
    truth.append(gt([A, B], [1, 2], [False, True]))
    dets.append(det([A, FAR], [0.3, 0.99], [1, 2]))
    metrics = evaluate_voc(truth, dets, num_classes=4, metric="voc12", class_names=["a", "b", "c", "d"])
    assert set(metrics["per_class"]) == {"a", "b"}
    assert metrics["per_class"]["b"] == pytest.approx(1.0)
    assert metrics["mAP"] == pytest.approx((5 / 9 + 1) / 2)


def test_each_ground_truth_matches_once_and_by_highest_iou():
    # Two GTs side by side; the top detection overlaps both but the left one most → TP on the left. The second
    # detection's best GT is also the left one (already taken) → FP, as in the devkit, even though it overlaps
    # the right one by more than 0.5 too.
    left, right = [0, 0, 10, 10], [1, 0, 11, 10]  # IoU(left, right) = 90 / 110
    truth = [gt([left, right], [0, 0])]
    dets = [det([left, [0.4, 0, 10.4, 10]], [0.9, 0.8], [0, 0])]  # IoU 96/104 with left, 94/106 with right
    tp, fp, _ = match_class([truth[0].boxes], [truth[0].difficult], [dets[0]["boxes"]], [dets[0]["scores"]])
    assert tp.tolist() == [True, False] and fp.tolist() == [False, True]


def test_plus_one_moves_a_borderline_box_across_the_threshold():
    # GT [0, 0, 9, 9] and detection [0, 0, 9, 4] (the top half):
    #   continuous areas 9*9 = 81 and 9*4 = 36, intersection 36: IoU 36/81 = 0.444 < 0.5 → FP, AP 0;
    #   +1 pixels 10*10 = 100 and 10*5 = 50, intersection 50: IoU 50/100 = 0.5 → TP (threshold inclusive), AP 1.
    g, d = np.array([[0, 0, 9, 9]], float), np.array([[0, 0, 9, 4]], float)
    assert box_iou_numpy(d, g)[0, 0] == pytest.approx(36 / 81)
    assert box_iou_numpy(d, g, plus_one=True)[0, 0] == 0.5
    truth, dets = [gt(g, [0])], [det(d, [0.9], [0])]
    assert evaluate_voc(truth, dets, 1, "voc12")["mAP"] == 0.0
    assert evaluate_voc(truth, dets, 1, "voc12", plus_one=True)["mAP"] == pytest.approx(1.0)


def test_tensors_are_accepted():
    truth, dets = three_gts_four_dets()
    as_tensors = [{k: torch.as_tensor(v) for k, v in d.items()} for d in dets]
    assert evaluate_voc(truth, as_tensors, 1, "voc07")["mAP"] == pytest.approx(6 / 11)


class VocLikeDataset:
    """The evaluation protocol with per-image difficult flags, as a VOC reader provides them."""

    class_names = ["a"]
    num_classes = 1
    image_ids = [7, 3]

    def __len__(self) -> int:
        return 2

    def annotations(self, index):
        return [np.array([A, B, C], np.float32), np.array([D], np.float32)][index], np.zeros(3 - 2 * index, np.int64)

    def difficult(self, index):
        return [np.zeros(3, bool), np.ones(1, bool)][index]


def test_dataset_protocol_with_difficult_flags():
    ds = VocLikeDataset()
    truth = dataset_ground_truth(ds)
    assert truth[1].difficult.tolist() == [True] and truth[0].difficult.tolist() == [False] * 3
    # Predictions arrive in any order, keyed by image id; image 3's only box hits the difficult object.
    predictions = [{"image_id": 3, **det([D], [0.99], [0])}, {"image_id": 7, **three_gts_four_dets()[1][0]}]
    assert [p.get("image_id") for p in align_predictions(ds, predictions)] == [7, 3]
    metrics = evaluate_dataset(ds, predictions, metric="voc12")
    assert metrics["mAP"] == pytest.approx(5 / 9)
    assert metrics["confusion_matrix"].shape == (2, 2)
    with pytest.raises(ValueError, match="coco, voc07, voc12"):
        evaluate_dataset(ds, predictions, metric="voc")
