"""The command-line tools end to end, as a user runs them (tiny data, seconds)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_train_eval_predict_from_the_command_line(tiny_builtin, tmp_path):
    run_dir = tmp_path / "run"
    out = run(
        "tools/train.py", f"hydra.run.dir={run_dir}", f"data.builtin.root={tiny_builtin}",
        "data.builtin.num_train=24", "data.builtin.num_val=8", "data.builtin.min_size=96",
        "data.builtin.max_size=128", "data.builtin.workers=1", "data.img_size=96", "data.batch_size=8",
        "model.backbone.width=8", "trainer.epochs=1", "trainer.threads=1",
    )
    assert "mAP@[.5:.95]" in out and (run_dir / "last.pt").is_file()
    trained = json.loads((run_dir / "metrics.json").read_text())

    eval_dir = tmp_path / "eval"
    out = run("tools/eval.py", f"checkpoint={run_dir / 'last.pt'}", f"hydra.run.dir={eval_dir}")
    assert abs(json.loads((eval_dir / "metrics.json").read_text())["AP"] - trained["AP"]) < 1e-4
    assert (eval_dir / "report.txt").read_text().startswith("checkpoint")
    assert "instances_val.json at 128 px" in (eval_dir / "report.txt").read_text()  # data.test_size: 96 x 1.25
    small_dir = tmp_path / "eval_96"
    run("tools/eval.py", f"checkpoint={run_dir / 'last.pt'}", f"hydra.run.dir={small_dir}", "test_size=96")
    assert "instances_val.json at 96 px" in (small_dir / "report.txt").read_text()
    assert (run_dir / "curves.png").is_file() and (run_dir / "pr_curves.png").is_file()

    voc_dir = tmp_path / "eval_voc"
    out = run("tools/eval.py", f"checkpoint={run_dir / 'last.pt'}", f"hydra.run.dir={voc_dir}", "eval.metric=voc07")
    voc = json.loads((voc_dir / "metrics.json").read_text())
    assert {"mAP", "AP50", "per_class"} <= set(voc) and voc["metric"] == "voc07" and 0 <= voc["mAP"] <= 1
    assert "VOC2007 11-point" in (voc_dir / "report.txt").read_text() and "voc07 mAP@0.5" in out
    for name in ("pr_curves.png", "confusion_matrix.png", "ap_per_class.png"):
        assert (voc_dir / name).read_bytes()[:4] == b"\x89PNG"

    pred_dir = tmp_path / "pred"
    run("tools/predict.py", f"checkpoint={run_dir / 'last.pt'}", f"source={tiny_builtin / 'images' / 'val'}",
        f"hydra.run.dir={pred_dir}", "score_thresh=0.0", "batch_size=3", "save_json=true",
        f"ann_file={tiny_builtin / 'annotations' / 'instances_val.json'}")
    records = json.loads((pred_dir / "detections.json").read_text())
    assert len(records) == 8 and len(list(pred_dir.glob("*.jpg"))) == 8
    assert all({"box_xyxy", "score", "label", "class"} <= set(d) for r in records for d in r["detections"])
    # batches of 3 (the last one of 2) give what the training run's evaluation predicted, in COCO's format
    results = json.loads((pred_dir / "results.json").read_text())
    assert len(results) == sum(len(r["detections"]) for r in records) > 0
    assert_has_best_detection(results, json.loads((run_dir / "predictions.json").read_text()))

    # test_size=96: what tools/eval.py test_size=96 predicted (not the default 128 px letterbox)
    small_pred = tmp_path / "pred_96"
    run("tools/predict.py", f"checkpoint={run_dir / 'last.pt'}", f"source={tiny_builtin / 'images' / 'val'}",
        f"hydra.run.dir={small_pred}", "score_thresh=0.0", "save_images=false", "save_json=true", "test_size=96",
        f"ann_file={tiny_builtin / 'annotations' / 'instances_val.json'}")
    small = json.loads((small_pred / "results.json").read_text())
    assert_has_best_detection(small, json.loads((small_dir / "predictions.json").read_text()))
    assert small != results


def assert_has_best_detection(results: list[dict], evaluated: list[dict]) -> None:
    """``results`` hold the highest-scoring detection of ``evaluated`` (same image, class, score, box)."""
    best = max(evaluated, key=lambda r: r["score"])
    twin = [r for r in results if r["image_id"] == best["image_id"] and r["category_id"] == best["category_id"]
            and abs(r["score"] - best["score"]) < 1e-3]
    assert twin and max(abs(a - b) for a, b in zip(twin[0]["bbox"], best["bbox"])) < 0.05


def test_bad_checkpoint_path_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "tools/eval.py", f"checkpoint={tmp_path / 'nope.pt'}",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "nope.pt does not exist" in result.stderr


def test_bad_dataset_stops_training_with_one_clear_message(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 5]}],
        "categories": [{"id": 1, "name": "x"}],
    }))
    result = subprocess.run(
        [sys.executable, "tools/train.py", "data=coco", f"data.train_json={ann}",
         f"data.train_images={tmp_path / 'img'}", f"data.val_json={ann}", f"data.val_images={tmp_path / 'img'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "ann.json: image 1 ('a.png'), annotation 5: box [0, 0, 0, 5] has zero width" in result.stderr
    assert "Traceback" not in result.stderr
