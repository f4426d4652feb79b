"""The evaluation and training figures: valid PNGs, and confusion-matrix counts on a case worked by hand."""

import numpy as np
from PIL import Image

from detkit.evaluation.confusion import confusion_matrix
from detkit.evaluation.plots import (
    FILES,
    plot_ap_per_class,
    plot_confusion_matrix,
    plot_pr_curves,
    plot_training_curves,
    write_evaluation_plots,
)
from detkit.evaluation.voc import ImageGroundTruth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_confusion_matrix_counts_by_hand():
    # Classes 0 and 1; index 2 is background. Image 0:
    #   det class 0 on GT A (class 0)                     → (true 0, pred 0)
    #   det class 0 on GT B (class 1)                     → (true 1, pred 0): a class confusion
    #   det class 1 far from everything                   → (background, pred 1): false positive
    #   det on GT C (class 0) scoring below the threshold → dropped, so C is missed → (true 0, background)
    #   det class 1 on difficult GT D                     → not counted; nor is D
    # Image 1: GT E (class 1) without detections → (true 1, background).
    a, b, c, d, far = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [90, 90, 99, 99]
    truth = [ImageGroundTruth(np.array([a, b, c, d], float), np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1], bool)),
             ImageGroundTruth(np.array([a], float), np.array([1]), np.zeros(1, bool))]
    dets = [{"boxes": np.array([a, b, far, c, d], float), "scores": np.array([0.9, 0.8, 0.7, 0.1, 0.9]),
             "labels": np.array([0, 0, 1, 0, 1])},
            {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    matrix = confusion_matrix(truth, dets, num_classes=2, score_threshold=0.25)
    np.testing.assert_array_equal(matrix, [[1, 0, 1],
                                           [1, 0, 1],
                                           [0, 1, 0]])
    # With no score threshold C's detection counts and C is no longer missed.
    assert confusion_matrix(truth, dets, 2, score_threshold=0.0)[0].tolist() == [2, 0, 0]


def test_every_plot_is_a_png(tmp_path):
    names = [f"class{i}" for i in range(12)]
    recall = np.linspace(0, 1, 101)
    curves = {n: (recall, np.clip(1 - recall ** (i + 1), 0, 1)) for i, n in enumerate(names)}
    per_class = {n: 0.1 * (i % 10) for i, n in enumerate(names)}
    matrix = np.random.default_rng(0).integers(0, 20, (13, 13))
    history = [{"epoch": e, "lr": 0.01 / e, "loss": 2 / e, "loss_box": 1 / e}
               | ({"AP": 0.1 * e, "AP50": 0.2 * e} if e % 2 == 0 else {}) for e in range(1, 5)]
    paths = [plot_pr_curves(curves, tmp_path / "pr.png", per_class), plot_ap_per_class(per_class, tmp_path / "ap.png"),
             plot_confusion_matrix(matrix, names, tmp_path / "cm.png"),
             plot_training_curves(history, tmp_path / "curves.png")]
    for path in paths:
        assert_png(path)


def test_write_evaluation_plots_writes_the_three_files(tmp_path):
    metrics = {"mAP": 0.5, "per_class": {"a": 0.4, "b": 0.6}, "iou_threshold": 0.5,
               "pr_curves": {"a": (np.array([0.5, 1.0]), np.array([1.0, 0.4]))},
               "confusion_matrix": np.eye(3, dtype=int)}
    written = write_evaluation_plots(metrics, tmp_path, ["a", "b"])
    assert sorted(p.name for p in written) == sorted([FILES["pr_curves"], FILES["ap"], FILES["confusion"]])
    for path in written:
        assert_png(path)
