"""Pre-flight check: every problem by file and record, information, statistics, and the exit status rule."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from detkit.data.check import check_dataset, near_duplicates

ROOT = Path(__file__).resolve().parents[2]


def voc_cfg(root, classes, on_invalid="error"):
    split = {"_target_": "detkit.data.voc.VOCDetection", "roots": [str(root)], "split": "trainval",
             "class_names": classes, "on_invalid": on_invalid}
    return OmegaConf.create({"img_size": 64, "on_invalid": on_invalid, "train": split})


def test_problems_information_and_statistics(tmp_path, formats):
    root = formats.write_voc(tmp_path / "voc")
    xml = root / "Annotations" / "first.xml"
    xml.write_text(xml.read_text().replace("<name>c</name>", "<name>zebra</name>"))
    text, ok = check_dataset(voc_cfg(root, formats.CLASSES), ["train"])
    assert not ok
    assert "1 problem (1 × unknown class name)" in text
    assert f"{xml}: image 0 ('first.jpg'), object 1: unknown class name 'zebra'" in text
    assert "information: 1 images without boxes: empty.jpg" in text
    assert "3 images, 3 boxes (1 difficult)" in text
    # Letterboxed to 64: first.jpg ×1.6 turns its 19×20 box into sqrt(w·h) ≈ 31; second.jpg ×1.28 its 30×12 box
    # into ≈ 24 and its difficult 5×5 one into 6.4.
    lines = text.splitlines()
    sizes = {line.split()[0]: int(line.split()[2]) for line in lines if line.startswith("  [")}
    assert sizes == {"[0,": 1, "[8,": 0, "[16,": 2, "[32,": 0, "[64,": 0, "[128,": 0, "[256,": 0}
    _, ok = check_dataset(voc_cfg(root, formats.CLASSES, on_invalid="drop"), ["train"])
    assert ok


def test_unreadable_split_fails_even_when_dropping(tmp_path, formats):
    cfg = voc_cfg(tmp_path / "nowhere", formats.CLASSES, on_invalid="drop")
    text, ok = check_dataset(cfg, ["train"])
    assert not ok and "trainval.txt does not exist" in text and "no statistics" in text


def test_near_duplicates():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    assert near_duplicates(boxes, np.array([1, 1, 2, 1])) == [(0, 1)]


def test_tool_exit_status(tmp_path, formats):
    images = formats.write_yolo(tmp_path / "yolo")
    (tmp_path / "yolo" / "labels" / "first.txt").write_text("0 0.5 0.5 0 0.1\n")
    args = [sys.executable, "tools/check_dataset.py", "data=yolo", f"data.train_images={images}",
            f"data.val_images={images}", "data.names=[a,b,c]", "splits=[train]"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "first.txt: image 1 ('first.png'), line 1: box 0.5 0.5 0 0.1 has zero width" in result.stdout
    result = subprocess.run([*args, "data.on_invalid=drop"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "boxes per class" in result.stdout
