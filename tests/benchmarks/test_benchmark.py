"""The benchmark's pieces on small sizes: realistic synthetic outputs and a table with a baseline per section."""

import torch

from benchmarks.benchmark import (
    Timing,
    coco_eval_timings,
    format_table,
    postprocess_timings,
    synthetic_coco_eval,
    synthetic_ssd_outputs,
)


def test_synthetic_ssd_outputs_look_like_a_detector():
    boxes, scores = synthetic_ssd_outputs(batch=2, num_classes=21, seed=1)
    assert boxes.shape == (2, 8732, 4) and scores.shape == (2, 8732, 21)
    assert torch.allclose(scores.sum(-1), torch.ones(2, 8732), atol=1e-5)
    assert (boxes[..., 2:] > boxes[..., :2]).all()
    fg = scores[..., 1:]
    # Mostly background, yet some confident detections in every image.
    assert ((fg > 0.01).flatten(1).float().mean(1) < 0.01).all()
    assert ((fg > 0.5).flatten(1).sum(1) >= 5).all()


def test_postprocess_timings_tables():
    tables = postprocess_timings(repeats=1, batch=1, nms_boxes=200)
    assert len(tables) == 2
    for title, rows in tables:
        assert rows[0].ratio == 1.0 and "batched_nms" in rows[0].name
        assert all(r.median_ms > 0 for r in rows)
        text = format_table(title, rows)
        assert text.splitlines()[0] == title and len(text.splitlines()) == len(rows) + 2


def test_ratio_to_the_baseline():
    assert Timing("x", 3.0, 1.5).ratio == 2.0


def test_synthetic_coco_eval_and_its_timings():
    data, results = synthetic_coco_eval(num_images=30, num_classes=5, seed=2)
    assert len(data["images"]) == 30 and len(data["categories"]) == 5
    assert {r["image_id"] for r in results} <= {im["id"] for im in data["images"]}
    assert all(r["bbox"][2] > 0 and r["bbox"][3] > 0 for r in results)
    title, rows = coco_eval_timings(num_images=30, num_classes=5)
    assert rows[0].name == "pycocotools" and rows[0].ratio == 1.0 and "30 images x 5 classes" in title
    for row in rows[1:]:  # faster-coco-eval, when installed: the same numbers
        assert float(row.name.split("|diff| ")[1].rstrip(")")) < 1e-12


def test_synthetic_batch_for_the_ssd_benchmark():
    from benchmarks.benchmark import synthetic_batch

    images, targets = synthetic_batch(batch=3, size=300, seed=1)
    assert images.shape == (3, 3, 300, 300) and len(targets) == 3
    for t in targets:
        boxes = t["boxes"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 300
        assert t["labels"].min() >= 0 and t["labels"].max() < 20
