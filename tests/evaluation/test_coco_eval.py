import torch

from detkit.data.coco import CocoDetection
from detkit.evaluation.coco import evaluate_coco, format_table, to_coco_results


def ground_truth_as_predictions(ds: CocoDetection) -> list[dict]:
    out = []
    for i in range(len(ds)):
        boxes, labels = ds.annotations(i)
        out.append({"image_id": ds.image_ids[i], "boxes": torch.from_numpy(boxes),
                    "scores": torch.ones(len(boxes)), "labels": torch.from_numpy(labels)})
    return out


def test_results_use_dataset_category_ids_and_xywh(tiny_builtin):
    ds = CocoDetection(tiny_builtin / "annotations" / "instances_val.json", tiny_builtin / "images" / "val")
    results = to_coco_results(ground_truth_as_predictions(ds), ds.label_to_category_id)
    gt = ds.coco
    first = gt.loadAnns(gt.getAnnIds(imgIds=[results[0]["image_id"]]))
    assert {r["category_id"] for r in results} <= set(gt.getCatIds())
    assert any(a["category_id"] == results[0]["category_id"]
               and all(abs(x - y) < 1e-3 for x, y in zip(a["bbox"], results[0]["bbox"])) for a in first)


def test_perfect_predictions_score_one_and_none_score_zero(tiny_builtin):
    ds = CocoDetection(tiny_builtin / "annotations" / "instances_val.json", tiny_builtin / "images" / "val")
    results = to_coco_results(ground_truth_as_predictions(ds), ds.label_to_category_id)
    metrics = evaluate_coco(ds.coco, results, ds.class_names)
    assert metrics["AP"] > 0.999 and metrics["AP50"] > 0.999
    present = {ds.class_names[ds.category_id_to_label[a["category_id"]]] for a in ds.coco.dataset["annotations"]}
    assert all(metrics["per_class"][name] > 0.999 for name in present)
    assert "AP50" in format_table(metrics) and "class" in format_table(metrics)
    # Shifting every box by half its size must cost AP.
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 2, *r["bbox"][1:]]) for r in results]
    assert evaluate_coco(ds.coco, shifted)["AP"] < 0.5
    empty = evaluate_coco(ds.coco, [], ds.class_names)
    assert empty["AP"] == 0.0 and set(empty["per_class"]) == set(ds.class_names)
