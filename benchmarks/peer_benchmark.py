"""Head-to-head at equal wall-clock budgets: detkit's default detector vs ultralytics YOLOv8n.

Both train from scratch on the same COCO-format dataset (any detkit data config that reads COCO jsons: builtin,
coco, suite_*), at the same input size, in fresh processes with the same wall budget (detkit:
``trainer.max_minutes``; ultralytics: its ``time`` argument), then both are scored by pycocotools on the same val
json: ultralytics' predictions are mapped back to the json's image and category ids. ultralytics is an optional
peer (``pip install detkit[bench]``) that runs only in its own subprocess; detkit never imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pycocotools.coco import COCO

from detkit.api import compose_train_config
from detkit.app.build import prepare_data
from detkit.app.evaluate import load_trained
from detkit.errors import ConfigError
from detkit.evaluation.coco import evaluate_coco
from detkit.utils.complexity import complexity

ROOT = Path(__file__).resolve().parents[1]  # the repository: run_detkit runs its tools/train.py from there
SUITE = ("suite_tiny", "suite_large", "suite_crowded", "suite_wide")  # configs/data/suite_*.yaml
COCO_READER = "detkit.data.coco.CocoDetection"


def scoped_overrides(name: str, names: Sequence[str], overrides: Sequence[str], what: str) -> list[str]:
    """The ``overrides`` that apply to the run ``name`` of a table whose runs are ``names``: the plain ones (every
    run) and those written ``NAME:key=value`` for this run, unprefixed (a key only one model has, or one run's
    own data: ``yolov1_cpu:data=builtin_large``). A prefix outside ``names`` is a
    :class:`~detkit.errors.ConfigError` (``what`` names a run in it: "parity pair")."""
    chosen = []
    for override in overrides:
        prefix, sep, rest = override.partition(":")
        if sep and "=" not in prefix:  # NAME:key=value (a value may hold ':', a key never does)
            if prefix not in names:
                raise ConfigError(f"override {override!r}: unknown {what} {prefix!r}; available: {', '.join(names)}")
            if prefix == name:
                chosen.append(rest)
        else:
            chosen.append(override)
    return chosen


def _in_repo(path: str | Path) -> Path:
    """A config path as tools/train.py (run from the repository) reads it."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


@contextlib.contextmanager
def in_repository() -> Iterator[None]:
    """The working directory is the repository while inside: relative data roots are read as tools/train.py
    (run from there) reads them (contextlib.chdir: Python 3.11)."""
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


def benchmark_data(data_config: str, overrides: Sequence[str] = ()) -> tuple[list[str], dict[str, Path]]:
    """detkit's overrides for training on the data config ``data_config`` (``builtin``, ``coco``, ``suite_tiny``...)
    with the user's ``overrides``, scoring its val split (``data.eval_split=val`` where the config scores a
    ``tune`` split by default), and that dataset's ``train_json``, ``train_images``, ``val_json``,
    ``val_images`` (absolute) for the peer. A generated dataset is generated first
    (:func:`~detkit.app.build.prepare_data`)."""
    detkit_overrides = [f"data={data_config}", *overrides]
    cfg = compose_train_config(detkit_overrides)
    if "eval_split" in cfg.data:
        detkit_overrides.append("data.eval_split=val")
        cfg = compose_train_config(detkit_overrides)
    for split in ("train", "val"):
        if cfg.data[split]._target_ != COCO_READER:
            raise ValueError(f"data={data_config} reads its {split} split with {cfg.data[split]._target_}; "
                             f"the peer benchmark needs COCO jsons ({COCO_READER})")
    with in_repository():
        prepare_data(cfg.data)
    paths = {f"{split}_{kind}": _in_repo(cfg.data[split][key])
             for split in ("train", "val") for kind, key in (("json", "ann_file"), ("images", "image_dir"))}
    return detkit_overrides, paths


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


def all_cores(_):
    # ultralytics' select_device (trainer and predictor set-up) sets torch to cpu_count - 1 threads; these
    # callbacks run after it
    torch.set_num_threads(a["threads"])


# training batches done (the time limit may stop ultralytics inside an epoch), torch threads they ran with
batches, threads = [0], [0]


def count_batch(trainer):
    batches[0] += 1
    threads[0] = torch.get_num_threads()


model = YOLO(a["model"])
if a["threads"]:
    model.add_callback("on_train_start", all_cores)
model.add_callback("on_train_batch_end", count_batch)
start = time.perf_counter()
model.train(data=a["data"], imgsz=a["imgsz"], epochs=1000, time=a["minutes"] / 60, batch=a["batch"],
            pretrained=False, plots=False, val=False, seed=a["seed"], device="cpu", project=a["out"],
            name="train", exist_ok=True, amp=False, verbose=False)
seconds = time.perf_counter() - start
trainer = model.trainer
weights = trainer.best if Path(trainer.best).exists() else trainer.last
trained = YOLO(str(weights))
if a["threads"]:
    trained.add_callback("on_predict_start", all_cores)
predictions = []
for r in trained.predict(source=a["val_images"], imgsz=a["imgsz"], conf=0.001, iou=0.7, max_det=300,
                         stream=True, verbose=False, device="cpu"):
    predictions.append({"file": Path(r.path).name, "boxes": r.boxes.xyxy.tolist(), "scores": r.boxes.conf.tolist(),
                        "classes": r.boxes.cls.int().tolist()})
net = trained.model.float().eval()
c = complexity(net, (1, 3, a["imgsz"], a["imgsz"]))
json.dump({"epochs": trainer.epoch + 1, "images": batches[0] * a["batch"], "train_seconds": seconds,
           "threads": threads[0],
           "params": c.params, "flops": c.flops,
           "predictions": predictions}, open(Path(a["out"]) / "peer.json", "w"))
"""


def run_ultralytics(data: dict[str, Path], out: str | Path, minutes: float, imgsz: int, batch: int = 16,
                    seed: int = 0, model: str = "yolov8n.yaml", threads: int | None = None) -> dict:
    """Train ultralytics ``model`` from scratch for ``minutes`` on the COCO dataset ``data`` (``train_json``,
    ``train_images``, ``val_json``, ``val_images``, as :func:`benchmark_data` gives), predict its val images
    and score them on ``val_json``. ``threads``: torch threads while training and predicting (None: ultralytics'
    own cpu_count - 1)."""
    out = Path(out).resolve()
    yolo = out / "yolo_data"
    for split in ("train", "val"):
        write_yolo_layout(data[f"{split}_json"], data[f"{split}_images"], yolo, split)
    ann = Path(data["val_json"])
    val = COCO(str(ann))
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
    metrics = evaluate_coco(val, peer_predictions_to_coco(peer["predictions"], ann))
    train_images = len(list((yolo / "images" / "train").iterdir()))
    return {"name": f"ultralytics {Path(model).stem} ({peer['threads']} threads)", "model": Path(model).stem,
            "threads": "all" if threads else "default", "epochs": peer["images"] / train_images, "wall_s": wall,
            "img_s": peer["images"] / peer["train_seconds"], "img_size": imgsz, "AP": metrics["AP"],
            "AP50": metrics["AP50"], "params": peer["params"], "flops": peer["flops"]}


def train_arguments(minutes: float, overrides: Sequence[str] = ()) -> list[str]:
    """The arguments of ``tools/train.py`` for a run of ``minutes`` with ``overrides`` (plots off: they are
    drawn after training, outside what a budgeted run compares)."""
    return [f"trainer.max_minutes={minutes:g}", "eval.plots=false", *overrides]


def run_training(out: str | Path, minutes: float, overrides: Sequence[str] = (), **popen) -> float:
    """Run ``tools/train.py`` (:func:`train_arguments`) from the repository in a fresh process that imports the
    repository's detkit, its run folder ``out``; ``popen``: further arguments of ``subprocess.run`` (e.g.
    ``stdout``). Returns its wall seconds; a failed run raises ``subprocess.CalledProcessError``."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), *train_arguments(minutes, overrides),
           f"hydra.run.dir={Path(out).resolve()}"]
    # (a script's folder, tools/, heads sys.path, not the repository: without this an installed detkit answers)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, **popen)
    return time.perf_counter() - start


def run_detkit(out: str | Path, minutes: float, overrides: list[str] = ()) -> dict:
    """``tools/train.py trainer.max_minutes=minutes`` in a fresh process; scored from its predictions.json
    by pycocotools like the peer."""
    out = Path(out).resolve()
    wall = run_training(out, minutes, overrides)
    model, cfg, state = load_trained(out / "last.pt")
    ann = _in_repo(cfg.data.val.ann_file)
    metrics = evaluate_coco(COCO(str(ann)), json.loads((out / "predictions.json").read_text()))
    c = complexity(model, (1, 3, cfg.data.img_size, cfg.data.img_size))
    images = state["global_step"] * cfg.data.batch_size
    train_images = len(COCO(str(_in_repo(cfg.data.train.ann_file))).getImgIds())
    return {"name": f"detkit {cfg.model._target_.rsplit('.', 1)[-1]}", "epochs": images / train_images,
            "wall_s": wall, "img_s": images / max(state["hooks"]["budget"]["used"], 1e-9),
            "img_size": int(cfg.data.img_size), "test_size": int(cfg.data.test_size or cfg.data.img_size),
            "AP": metrics["AP"], "AP50": metrics["AP50"], "params": c.params, "flops": c.flops}


def run_pair(data_config: str, out: str | Path, minutes: float, overrides: Sequence[str] = (),
             imgsz: int | None = None, threads: Sequence[int | None] = (None,), batch: int = 16,
             model: str = "yolov8n.yaml") -> list[dict]:
    """detkit, then the peer once per entry of ``threads`` (:func:`run_ultralytics`), on data config
    ``data_config``'s val split, into ``out/detkit`` and ``out/ultralytics_{all,default}``. ``imgsz``: both train
    and test at it; None: detkit at its own sizes (its config or its data-adaptive choice) and the peer at
    detkit's training size."""
    out = Path(out)
    sizes = [f"data.img_size={imgsz}", f"data.test_size={imgsz}"] if imgsz else []
    detkit_overrides, data = benchmark_data(data_config, [*sizes, *overrides])
    rows = [run_detkit(out / "detkit", minutes, detkit_overrides)]
    for n in threads:
        rows.append(run_ultralytics(data, out / f"ultralytics_{'all' if n else 'default'}", minutes,
                                    imgsz or rows[0]["img_size"], batch, model=model, threads=n))
    return rows


def peer_threads(mode: str) -> list[int | None]:
    """The peer's torch threads per run for ``--peer-threads all|default|both``: every core, ultralytics' own
    setting (None), or both runs."""
    runs = {"all": [os.cpu_count()], "default": [None], "both": [os.cpu_count(), None]}
    if mode not in runs:
        raise ValueError(f"peer threads {mode!r}: all, default or both")
    return runs[mode]


# Below this a peer's AP prints as 0.0000: a ratio to it is only a lower bound.
AP_FLOOR = 0.0005


def ap_ratio(ours: float, theirs: float) -> str:
    """``ours / theirs`` as "2.00x"; a lower bound when ``theirs`` rounds to 0 at 4 decimals, "—" if both do."""
    if theirs >= AP_FLOOR:
        return f"{ours / theirs:.2f}x"
    return f"> {int(ours / AP_FLOOR + 1e-9)}x (peer AP < {AP_FLOOR})" if ours >= AP_FLOOR else "—"


def format_peer_table(rows: list[dict], minutes: float, imgsz: int | None = None, data: str = "") -> str:
    """Markdown table of :func:`run_pair`'s results (detkit first)."""
    size = f"input {imgsz} px" if imgsz else "detkit at its own sizes, the peer at detkit's training size"
    lines = [f"{data + ': ' if data else ''}budget {minutes:g} min per run, {size}, CPU, scored by pycocotools on "
             "the same val json", "", "| run | epochs | wall s | train img/s | AP | AP50 | params (M) | GFLOPs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['epochs']:.2f} | {r['wall_s']:.0f} | {r['img_s']:.1f} | {r['AP']:.4f} | "
                     f"{r['AP50']:.4f} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} |")
    ratios = [f"AP ratio {rows[0]['name']} / {r['name']}: {ap_ratio(rows[0]['AP'], r['AP'])}" for r in rows[1:]]
    return "\n".join(lines + ([""] + ratios if ratios else []))


def _ap(rows: list[dict], threads: str) -> str:
    peer = [r for r in rows[1:] if r["threads"] == threads]
    return f"{peer[0]['AP']:.4f} | {peer[0]['AP50']:.4f}" if peer else "— | —"


def format_suite_table(results: dict[str, list[dict]], minutes: float) -> str:
    """One markdown row per dataset of ``{data config: run_pair rows}``: detkit's AP/AP50, the peer's with every
    core and out of the box, and detkit's AP over the stronger peer run's."""
    peer = next((r["model"] for rows in results.values() for r in rows[1:]), "peer")
    lines = [f"budget {minutes:g} min per run, CPU, val splits scored by pycocotools", "",
             f"| dataset | detkit AP | detkit AP50 | {peer} AP (all cores) | AP50 | {peer} AP (out of the box) | AP50 "
             f"| detkit / {peer} AP |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for data, rows in results.items():
        best = max((r["AP"] for r in rows[1:]), default=0.0)
        ratio = ap_ratio(rows[0]["AP"], best)
        lines.append(f"| {data} | {rows[0]['AP']:.4f} | {rows[0]['AP50']:.4f} | {_ap(rows, 'all')} | "
                     f"{_ap(rows, 'default')} | {ratio} |")
    return "\n".join(lines)
