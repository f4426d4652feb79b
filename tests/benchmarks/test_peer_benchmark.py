import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pycocotools.coco import COCO

import benchmarks.peer_benchmark as peer_benchmark
from benchmarks.peer_benchmark import (
    ROOT,
    SUITE,
    ULTRALYTICS_SCRIPT,
    benchmark_data,
    format_peer_table,
    peer_predictions_to_coco,
    run_pair,
    write_yolo_layout,
)
from detkit.data.coco import CocoDetection
from detkit.data.yolo_txt import YoloTxtDetection


def test_the_yolo_layout_holds_the_same_boxes_and_classes_as_the_coco_json(tiny_builtin, tmp_path):
    ann = tiny_builtin / "annotations" / "instances_val.json"
    images = write_yolo_layout(ann, tiny_builtin / "images" / "val", tmp_path, "val")
    coco = CocoDetection(ann, tiny_builtin / "images" / "val")
    yolo = YoloTxtDetection(images, coco.class_names)
    assert len(yolo) == len(coco) > 0
    position = {Path(im["file_name"]).name: j for j, im in enumerate(yolo.images)}
    for i, image in enumerate(coco.images):
        a, b = coco.get_sample(i), yolo.get_sample(position[Path(image["file_name"]).name])
        assert torch.equal(torch.as_tensor(a.labels), torch.as_tensor(b.labels))
        assert torch.allclose(torch.as_tensor(a.boxes), torch.as_tensor(b.boxes), atol=0.01)


def test_peer_predictions_get_the_jsons_image_and_category_ids(tiny_builtin):
    ann = tiny_builtin / "annotations" / "instances_val.json"
    coco = COCO(str(ann))
    image_id = sorted(coco.getImgIds())[3]
    name = coco.imgs[image_id]["file_name"].split("/")[-1]
    gt = coco.imgToAnns[image_id][0]
    x, y, w, h = gt["bbox"]
    cls = sorted(coco.getCatIds()).index(gt["category_id"])
    results = peer_predictions_to_coco([{"file": name, "boxes": [[x, y, x + w, y + h]], "scores": [0.9],
                                         "classes": [cls]}], ann)
    assert results == [{"image_id": image_id, "category_id": gt["category_id"], "bbox": [x, y, w, h],
                        "score": 0.9}]
    with pytest.raises(ValueError, match="not an image of"):
        peer_predictions_to_coco([{"file": "nope.jpg", "boxes": [], "scores": [], "classes": []}], ann)


def test_the_table_states_the_budget_and_the_ap_ratio():
    rows = [{"name": "detkit A", "epochs": 5.0, "wall_s": 300, "img_s": 80.0, "AP": 0.44, "AP50": 0.81,
             "params": 1.7e6, "flops": 1.26e9},
            {"name": "ultralytics yolov8n", "epochs": 3, "wall_s": 301, "img_s": 40.0, "AP": 0.22, "AP50": 0.4,
             "params": 3.0e6, "flops": 3.6e9}]
    table = format_peer_table(rows, 5, 384)
    assert "budget 5 min" in table and "| detkit A | 5.00 | 300 | 80.0 | 0.4400 |" in table
    assert "2.00x" in table
    json.dumps(rows)
    # a peer whose AP rounds to 0.0000 gives a lower bound, not a ratio to a rounding residue
    rows[1]["AP"] = 1.1e-6
    assert "AP ratio detkit A / ultralytics yolov8n: > 880x (peer AP < 0.0005)" in format_peer_table(rows, 5)
    rows[0]["AP"] = 0.0
    assert "ultralytics yolov8n: —" in format_peer_table(rows, 5)


@pytest.fixture
def mocked_runs(monkeypatch):
    """run_detkit, run_ultralytics and prepare_data replaced by recorders; detkit's AP is 0.4 and the peer's 0.2
    with every core, 0.1 out of the box."""
    calls = {"detkit": [], "peer": [], "prepared": []}

    def run_detkit(out, minutes, overrides=()):
        calls["detkit"].append({"out": out, "minutes": minutes, "overrides": list(overrides)})
        return {"name": "detkit YOLOv3", "epochs": 5.0, "wall_s": 60, "img_s": 80.0, "img_size": 320,
                "test_size": 400, "AP": 0.4, "AP50": 0.8, "params": 1.7e6, "flops": 1.2e9}

    def run_ultralytics(data, out, minutes, imgsz, batch=16, seed=0, model="yolov8n.yaml", threads=None):
        calls["peer"].append({"data": data, "out": out, "imgsz": imgsz, "threads": threads})
        return {"name": f"ultralytics yolov8n ({threads or 1} threads)", "model": "yolov8n",
                "threads": "all" if threads else "default", "epochs": 2.0, "wall_s": 61, "img_s": 20.0,
                "img_size": imgsz, "AP": 0.2 if threads else 0.1, "AP50": 0.4 if threads else 0.2,
                "params": 3e6, "flops": 2.9e9}

    monkeypatch.setattr(peer_benchmark, "run_detkit", run_detkit)
    monkeypatch.setattr(peer_benchmark, "run_ultralytics", run_ultralytics)
    monkeypatch.setattr(peer_benchmark, "prepare_data", lambda data_cfg: calls["prepared"].append(data_cfg))
    return calls


def test_the_data_configs_paths_reach_both_sides_and_its_val_split_is_scored(mocked_runs, tmp_path):
    root = tmp_path / "tiny"
    rows = run_pair("suite_tiny", tmp_path / "out", 5, [f"data.generate.root={root}"], threads=[2, None])
    detkit = mocked_runs["detkit"][0]["overrides"]
    assert detkit[0] == "data=suite_tiny" and f"data.generate.root={root}" in detkit
    assert detkit[-1] == "data.eval_split=val"
    assert mocked_runs["prepared"][0].generate.root == str(root)  # generated before either run
    expected = {"train_json": root / "annotations" / "instances_train.json", "train_images": root / "images" / "train",
                "val_json": root / "annotations" / "instances_val.json", "val_images": root / "images" / "val"}
    assert [c["data"] for c in mocked_runs["peer"]] == [expected, expected]
    assert [c["threads"] for c in mocked_runs["peer"]] == [2, None]
    assert [c["imgsz"] for c in mocked_runs["peer"]] == [320, 320]  # detkit's training size
    assert len(rows) == 3


def test_builtin_keeps_its_split_and_reads_paths_from_the_repository(mocked_runs):
    overrides, data = benchmark_data("builtin", ["data.img_size=256"])
    assert overrides == ["data=builtin", "data.img_size=256"]
    assert data["val_json"] == ROOT / "data" / "builtin" / "annotations" / "instances_val.json"
    assert data["train_images"] == ROOT / "data" / "builtin" / "images" / "train"
    with pytest.raises(ValueError, match="COCO jsons"):
        benchmark_data("voc")


def _run_peer_script(tmp_path, monkeypatch, threads):
    """ULTRALYTICS_SCRIPT against a stand-in ultralytics that, like its select_device, sets torch to one
    thread when training and predicting start; returns the peer.json and the threads predict ran with."""
    predicted = []

    class YOLO:
        def __init__(self, model):
            self.callbacks, self.model = {}, torch.nn.Conv2d(3, 4, 3)

        def add_callback(self, event, fn):
            self.callbacks.setdefault(event, []).append(fn)

        def run(self, event, arg):
            for fn in self.callbacks.get(event, []):
                fn(arg)

        def train(self, **kwargs):
            torch.set_num_threads(1)
            self.trainer = SimpleNamespace(best=str(tmp_path / "best.pt"), last=str(tmp_path / "last.pt"), epoch=0)
            self.run("on_train_start", self.trainer)
            self.run("on_train_batch_end", self.trainer)

        def predict(self, **kwargs):
            torch.set_num_threads(1)
            self.run("on_predict_start", None)
            predicted.append(torch.get_num_threads())
            return iter([])

    monkeypatch.setitem(sys.modules, "ultralytics", SimpleNamespace(YOLO=YOLO))
    args = {"model": "yolov8n.yaml", "data": "data.yaml", "imgsz": 32, "minutes": 0.1, "batch": 2, "seed": 0,
            "out": str(tmp_path), "val_images": str(tmp_path), "threads": threads}
    monkeypatch.setattr(sys, "argv", ["-c", json.dumps(args)])
    before = torch.get_num_threads()
    try:
        exec(compile(ULTRALYTICS_SCRIPT, "ultralytics_script", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(before)
    return json.loads((tmp_path / "peer.json").read_text()), predicted


def test_the_peer_script_gives_ultralytics_every_core_after_its_own_setting(tmp_path, monkeypatch):
    peer, predicted = _run_peer_script(tmp_path, monkeypatch, threads=3)
    assert peer["threads"] == 3 and predicted == [3] and peer["images"] == 2
    peer, predicted = _run_peer_script(tmp_path, monkeypatch, threads=None)
    assert peer["threads"] == 1 and predicted == [1]  # out of the box: ultralytics' own setting


def test_the_suite_table_has_one_row_per_dataset_with_the_ratio(mocked_runs, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "tools" / "bench_peers.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--suite", "--minutes", "1", "--out", str(tmp_path), "data.batch_size=4"])
    table = (tmp_path / "suite.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| suite_")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(SUITE)
    assert all(row.endswith("| 0.4000 | 0.8000 | 0.2000 | 0.4000 | 0.1000 | 0.2000 | 2.00x |") for row in rows)
    assert "yolov8n AP (all cores)" in table and "yolov8n AP (out of the box)" in table
    assert [c["overrides"][0] for c in mocked_runs["detkit"]] == [f"data={name}" for name in SUITE]
    assert all("data.batch_size=4" in c["overrides"] and c["overrides"][-1] == "data.eval_split=val"
               for c in mocked_runs["detkit"])
    assert [c["threads"] is None for c in mocked_runs["peer"]] == [False, True] * len(SUITE)  # both, by default
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert list(saved["datasets"]) == list(SUITE) and len(saved["datasets"]["suite_wide"]) == 3
