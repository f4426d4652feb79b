"""Head-to-head at equal wall-clock budgets: detkit's default detector vs ultralytics YOLOv8n.

Both train from scratch on the same COCO-format dataset, at the same input size, in fresh processes with
the same wall budget (detkit: ``trainer.max_minutes``; ultralytics: its ``time`` argument), then both are
scored by pycocotools on the same val json: ultralytics' predictions are mapped back to the json's image and
category ids. ultralytics is an optional peer (``pip install detkit[bench]``) that runs only in its own
subprocess; detkit never imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pycocotools.coco import COCO

from detkit.app.evaluate import load_trained
from detkit.evaluation.coco import evaluate_coco
from detkit.utils.complexity import complexity

ROOT = Path(__file__).resolve().parents[1]  # the repository: run_detkit runs its tools/train.py


def write_yolo_layout(ann_file: str | Path, image_dir: str | Path, out: str | Path, split: str) -> Path:
    """The split of a COCO dataset in YOLO's layout under ``out``: ``images/<split>/`` (links to the images)
    and ``labels/<split>/<stem>.txt`` with ``class cx cy w h`` normalised lines, the class being the index of
    the category in the json's sorted category ids. Returns the images folder."""
    coco = COCO(str(ann_file))
    category_index = {c: i for i, c in enumerate(sorted(coco.getCatIds()))}
    images, labels = Path(out) / "images" / split, Path(out) / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        source = Path(image_dir) / info["file_name"]
        link = images / Path(info["file_name"]).name
        if not link.exists():
            os.symlink(source.resolve(), link)
        w, h = info["width"], info["height"]
        lines = []
        for ann in coco.imgToAnns[image_id]:
            x, y, bw, bh = ann["bbox"]
            if ann.get("iscrowd", 0) or bw <= 0 or bh <= 0:
                continue
            lines.append(f"{category_index[ann['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                         f"{bw / w:.6f} {bh / h:.6f}")
        (labels / f"{link.stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    return images


def peer_predictions_to_coco(predictions: list[dict], ann_file: str | Path) -> list[dict]:
    """COCO results from per-image predictions ``{"file": name, "boxes": [[x1, y1, x2, y2], ...] (pixels),
    "scores": [...], "classes": [class index, ...]}``, with the json's image ids (by file name) and category
    ids (the class index into its sorted category ids)."""
    coco = COCO(str(ann_file))
    by_name = {Path(info["file_name"]).name: image_id for image_id, info in coco.imgs.items()}
    categories = sorted(coco.getCatIds())
    results = []
    for p in predictions:
        if p["file"] not in by_name:
            raise ValueError(f"prediction for {p['file']}, which is not an image of {ann_file}")
        for (x1, y1, x2, y2), score, cls in zip(p["boxes"], p["scores"], p["classes"]):
            results.append({"image_id": by_name[p["file"]], "category_id": categories[int(cls)],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results


# Runs in the peer's own process (argv[1]: JSON arguments); writes <out>/peer.json.
ULTRALYTICS_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import torch
from ultralytics import YOLO
from detkit.utils.complexity import complexity

a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"]) if a["threads"] else None
model = YOLO(a["model"])
batches = [0]  # training batches done: the time limit may stop ultralytics inside an epoch
model.add_callback("on_train_batch_end", lambda trainer: batches.__setitem__(0, batches[0] + 1))
start = time.perf_counter()
model.train(data=a["data"], imgsz=a["imgsz"], epochs=1000, time=a["minutes"] / 60, batch=a["batch"],
            pretrained=False, plots=False, val=False, seed=a["seed"], device="cpu", project=a["out"],
            name="train", exist_ok=True, amp=False, verbose=False)
seconds = time.perf_counter() - start
trainer = model.trainer
weights = trainer.best if Path(trainer.best).exists() else trainer.last
trained = YOLO(str(weights))
predictions = []
for r in trained.predict(source=a["val_images"], imgsz=a["imgsz"], conf=0.001, iou=0.7, max_det=300,
                         stream=True, verbose=False, device="cpu"):
    predictions.append({"file": Path(r.path).name, "boxes": r.boxes.xyxy.tolist(), "scores": r.boxes.conf.tolist(),
                        "classes": r.boxes.cls.int().tolist()})
net = trained.model.float().eval()
c = complexity(net, (1, 3, a["imgsz"], a["imgsz"]))
json.dump({"epochs": trainer.epoch + 1, "images": batches[0] * a["batch"], "train_seconds": seconds,
           "params": c.params, "flops": c.flops,
           "predictions": predictions}, open(Path(a["out"]) / "peer.json", "w"))
"""


def run_ultralytics(data_root: str | Path, out: str | Path, minutes: float, imgsz: int, batch: int = 16,
                    seed: int = 0, model: str = "yolov8n.yaml", threads: int | None = None) -> dict:
    """Train ultralytics ``model`` from scratch for ``minutes`` on the COCO dataset ``data_root``
    (``annotations/instances_{train,val}.json``, ``images/{train,val}``), predict its val split and score it."""
    data_root, out = Path(data_root), Path(out).resolve()
    yolo = out / "yolo_data"
    for split in ("train", "val"):
        write_yolo_layout(data_root / "annotations" / f"instances_{split}.json", data_root / "images" / split,
                          yolo, split)
    val = COCO(str(data_root / "annotations" / "instances_val.json"))
    names = [val.cats[c]["name"] for c in sorted(val.getCatIds())]
    (yolo / "data.yaml").write_text(json.dumps({"path": str(yolo), "train": "images/train", "val": "images/val",
                                                "names": dict(enumerate(names))}))
    args = {"model": model, "data": str(yolo / "data.yaml"), "imgsz": imgsz, "minutes": minutes, "batch": batch,
            "seed": seed, "out": str(out), "val_images": str(yolo / "images" / "val"), "threads": threads}
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", ULTRALYTICS_SCRIPT, json.dumps(args)], cwd=out, env=env, check=True)
    wall = time.perf_counter() - start
    peer = json.loads((out / "peer.json").read_text())
    ann = data_root / "annotations" / "instances_val.json"
    metrics = evaluate_coco(COCO(str(ann)), peer_predictions_to_coco(peer["predictions"], ann))
    train_images = len(list((yolo / "images" / "train").iterdir()))
    return {"name": f"ultralytics {Path(model).stem}", "epochs": peer["images"] / train_images, "wall_s": wall,
            "img_s": peer["images"] / peer["train_seconds"], "AP": metrics["AP"],
            "AP50": metrics["AP50"], "params": peer["params"], "flops": peer["flops"]}


def run_detkit(out: str | Path, minutes: float, overrides: list[str] = ()) -> dict:
    """``tools/train.py trainer.max_minutes=minutes`` in a fresh process; scored from its predictions.json
    by pycocotools like the peer."""
    out = Path(out).resolve()
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), f"trainer.max_minutes={minutes}",
           f"hydra.run.dir={out}", "eval.plots=false", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    model, cfg, state = load_trained(out / "last.pt")
    ann = Path(cfg.data.val.ann_file)
    ann = ann if ann.is_absolute() else ROOT / ann
    metrics = evaluate_coco(COCO(str(ann)), json.loads((out / "predictions.json").read_text()))
    c = complexity(model, (1, 3, cfg.data.img_size, cfg.data.img_size))
    images = state["global_step"] * cfg.data.batch_size
    train_images = len(COCO(str(ann.parent / "instances_train.json")).getImgIds())
    return {"name": f"detkit {cfg.model._target_.rsplit('.', 1)[-1]}", "epochs": images / train_images,
            "wall_s": wall, "img_s": images / max(state["hooks"]["budget"]["used"], 1e-9), "AP": metrics["AP"],
            "AP50": metrics["AP50"], "params": c.params, "flops": c.flops}


def format_peer_table(rows: list[dict], minutes: float, imgsz: int) -> str:
    """Markdown table of :func:`run_detkit` / :func:`run_ultralytics` results."""
    lines = [f"budget {minutes:g} min per run, input {imgsz} px, CPU, scored by pycocotools on the same val json",
             "", "| run | epochs | wall s | train img/s | AP | AP50 | params (M) | GFLOPs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['epochs']:.2f} | {r['wall_s']:.0f} | {r['img_s']:.1f} | {r['AP']:.4f} | "
                     f"{r['AP50']:.4f} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} |")
    if len(rows) == 2 and rows[1]["AP"] > 0:
        lines.append(f"\nAP ratio {rows[0]['name']} / {rows[1]['name']}: {rows[0]['AP'] / rows[1]['AP']:.2f}x")
    return "\n".join(lines)
