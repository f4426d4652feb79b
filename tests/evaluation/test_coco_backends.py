"""detkit's COCO numbers are pycocotools' numbers, whichever backend computes them."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.evaluation.coco import STAT_NAMES, evaluate_coco


def random_coco(seed: int = 0, images: int = 30, classes: int = 6) -> tuple[dict, list[dict]]:
    """Ground truth in COCO json (non-contiguous category ids, all size ranges, a crowd box) and detections:
    jittered copies of most objects, some with a wrong class, plus random boxes."""
    rng = np.random.default_rng(seed)
    cat_ids = [int(c) for c in rng.choice(np.arange(1, 100), classes, replace=False)]
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}
    results = []
    for image_id in range(1, images + 1):
        data["images"].append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.integers(0, 9)):
            w, h = rng.uniform(4, 200), rng.uniform(4, 150)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.choice(cat_ids))
            data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                        "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                        "iscrowd": int(rng.random() < 0.03)})
            if rng.random() < 0.8:
                j = rng.normal(0, 0.08, 4) * [w, h, w, h]
                wrong = rng.random() < 0.1
                results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)) if wrong else cat,
                                "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)],
                                "score": float(rng.random())})
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(4, 200), rng.uniform(4, 150)
            results.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                            "bbox": [rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h],
                            "score": float(rng.random())})
    return data, results


def pycocotools_stats(data: dict, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(data)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def coco_gt(data: dict) -> COCO:
    gt = COCO()
    gt.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@pytest.mark.parametrize("seed", [0, 1])
def test_all_twelve_stats_equal_pycocotools_called_directly(seed):
    data, results = random_coco(seed)
    expected = pycocotools_stats(data, results)
    assert 0.05 < expected[0] < 0.95  # a case that exercises the whole computation, not an all-0 or all-1 one
    metrics = evaluate_coco(coco_gt(data), results)
    assert [metrics[k] for k in STAT_NAMES] == [float(v) for v in expected]
    assert "segmentation" not in results[0]  # the caller's results are left as they were
    assert set(metrics["pr_curves"]) <= set(metrics["per_class"])
    recall, precision = next(iter(metrics["pr_curves"].values()))
    assert recall.shape == precision.shape == (101,)


@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_equals_pycocotools(seed):
    pytest.importorskip("faster_coco_eval")
    data, results = random_coco(seed)
    expected = pycocotools_stats(data, results)
    gt = coco_gt(data)
    slow = evaluate_coco(gt, results, backend="pycocotools")
    fast = evaluate_coco(gt, results, backend="faster_coco_eval")
    # Equal up to float summation order in the C++ accumulation.
    np.testing.assert_allclose([fast[k] for k in STAT_NAMES], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose([fast[k] for k in STAT_NAMES], [slow[k] for k in STAT_NAMES], rtol=0, atol=1e-12)
    for name in slow["per_class"]:
        assert fast["per_class"][name] == pytest.approx(slow["per_class"][name], abs=1e-12)
    assert fast["summary"] == slow["summary"]


def test_unknown_backend_is_refused():
    data, results = random_coco(0, images=2)
    with pytest.raises(ValueError, match="faster_coco_eval"):
        evaluate_coco(coco_gt(data), results, backend="detectron2")
