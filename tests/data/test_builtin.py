"""The built-in dataset: same bytes per seed, valid COCO, plausible statistics, atomic cached generation."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detkit.data import builtin
from detkit.data.builtin import CATEGORY_IDS, CLASS_NAMES, ensure_builtin, generate_builtin

TINY = {"num_train": 12, "num_val": 4, "min_size": 96, "max_size": 128}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def _boxes_by_image(coco: dict) -> dict[int, list[list[float]]]:
    """Image id -> its xywh boxes in annotation (= drawing) order, every image present."""
    out: dict[int, list[list[float]]] = {im["id"]: [] for im in coco["images"]}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        out[ann["image_id"]].append(ann["bbox"])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_builtin(tmp_path_factory.mktemp("builtin") / "tiny", seed=0, workers=1, **TINY)


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> dict:
    """200 small training images (no val split), parsed annotation file."""
    root = generate_builtin(tmp_path_factory.mktemp("builtin") / "medium", num_train=200, num_val=0, seed=3,
                            min_size=96, max_size=128, workers=2)
    return _coco(root, "train")


def test_layout(tiny):
    assert sorted(p.name for p in (tiny / "annotations").iterdir()) == ["instances_train.json",
                                                                         "instances_val.json"]
    assert len(list((tiny / "images" / "train").glob("*.jpg"))) == 12
    assert sorted(p.name for p in (tiny / "images" / "val").iterdir())[0] == "000000.jpg"
    assert json.loads((tiny / ".complete").read_text())["num_train"] == 12
    assert not list(tiny.parent.glob("tiny.tmp-*"))


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    again = generate_builtin(tmp_path / "again", seed=0, workers=2, **TINY)
    assert _hashes(again) == _hashes(tiny)
    other = generate_builtin(tmp_path / "other", seed=1, workers=1, **TINY)
    differing = [k for k, v in _hashes(other).items() if _hashes(tiny).get(k) != v]
    assert sum(k.endswith(".jpg") for k in differing) == 16
    assert {"annotations/instances_train.json", "annotations/instances_val.json"} <= set(differing)


def test_global_random_state_is_untouched():
    state = np.random.get_state()[1].copy()
    builtin.render_image(0, 0, 0, 96, 128)
    assert np.array_equal(np.random.get_state()[1], state)


@pytest.mark.parametrize("split", ["train", "val"])
def test_valid_coco(tiny, split):
    coco = _coco(tiny, split)
    api = COCO(str(tiny / "annotations" / f"instances_{split}.json"))
    assert len(api.getImgIds()) == TINY[f"num_{split}"]
    assert [c["id"] for c in coco["categories"]] == list(CATEGORY_IDS)
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    assert [im["id"] for im in coco["images"]] == list(range(1, len(coco["images"]) + 1))
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    sizes = {}
    for im in coco["images"]:
        with Image.open(tiny / "images" / split / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"]) and pil.mode == "RGB"
        assert 96 <= im["width"] <= 128 and 96 <= im["height"] <= 128
        sizes[im["id"]] = (im["width"], im["height"])
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert ann["area"] == pytest.approx(w * h) and ann["iscrowd"] == 0
        assert ann["category_id"] in CATEGORY_IDS


def test_category_ids_are_non_contiguous():
    assert len(CATEGORY_IDS) == len(CLASS_NAMES) == 10 and len(set(CATEGORY_IDS)) == 10
    assert list(CATEGORY_IDS) != list(range(min(CATEGORY_IDS), min(CATEGORY_IDS) + 10))


def test_statistics(medium):
    boxes = _boxes_by_image(medium)
    counts = np.array([len(b) for b in boxes.values()])
    assert 1 <= (counts == 0).sum() <= 25
    assert 3.0 <= counts.mean() <= 5.5 and counts.max() <= 8
    assert {a["category_id"] for a in medium["annotations"]} == set(CATEGORY_IDS)
    wh = np.array([a["bbox"][2:] for a in medium["annotations"]])
    assert wh.min() <= 6 and wh[:, 1].min() <= 10  # tiny digits ...
    assert wh[:, 1].max() >= 28  # ... up to about a third of the shorter image side
    sizes = np.array([(im["width"], im["height"]) for im in medium["images"]])
    assert (sizes[:, 0] != sizes[:, 1]).mean() > 0.9 and len(np.unique(sizes[:, 0])) > 20


def test_overlap_limits(medium):
    for image_boxes in _boxes_by_image(medium).values():
        xyxy = [(x, y, x + w, y + h) for x, y, w, h in image_boxes]
        for j, later in enumerate(xyxy):
            for earlier in xyxy[:j]:
                iw = min(later[2], earlier[2]) - max(later[0], earlier[0])
                ih = min(later[3], earlier[3]) - max(later[1], earlier[1])
                inter = max(iw, 0) * max(ih, 0)
                area_l = (later[2] - later[0]) * (later[3] - later[1])
                area_e = (earlier[2] - earlier[0]) * (earlier[3] - earlier[1])
                assert inter / (area_l + area_e - inter) <= 0.25 + 1e-9
                assert inter / area_e <= 0.35 + 1e-9


@pytest.mark.parametrize("kind", ["flat", "ramp", "bimodal", "noisy"])
def test_digit_luminance_contrasts_with_the_background_under_it(kind):
    rng = np.random.default_rng(0)
    for level in np.linspace(0, 255, 18):
        under = {"flat": np.full(400, level),
                 "ramp": np.linspace(max(level - 40, 0), min(level + 40, 255), 400),
                 "bimodal": np.r_[np.zeros(200), np.full(200, level)],
                 "noisy": np.clip(rng.normal(level, 60, 400), 0, 255)}[kind]
        p10, p90 = np.percentile(under, [10, 90])
        for _ in range(10):
            low, high = builtin._luminance_target(rng, under)
            assert 0 <= low <= high <= 255
            one_side = high <= min(under.mean() - 70, p10 - 20) or low >= max(under.mean() + 70, p90 + 20)
            between = min(low - p10, p90 - high) >= 75
            assert one_side or between, (kind, level, low, high)
        if kind != "bimodal" or level < 200:  # only a background spanning the whole range has no side
            assert one_side


def test_ensure_builtin_generates_once_and_on_parameter_change(tmp_path, capsys):
    root = tmp_path / "data" / "builtin"
    assert ensure_builtin(root, seed=0, workers=1, **TINY) == root
    first = capsys.readouterr().out
    assert first.count("\n") == 1 and "generating" in first and "done in" in first
    stamp = (root / ".complete").stat().st_mtime_ns
    hashes = _hashes(root)

    ensure_builtin(root, seed=0, workers=2, **TINY)  # workers do not change the output
    assert capsys.readouterr().out == "" and (root / ".complete").stat().st_mtime_ns == stamp

    ensure_builtin(root, seed=1, workers=1, **TINY)
    assert "generating" in capsys.readouterr().out
    assert json.loads((root / ".complete").read_text())["seed"] == 1 and _hashes(root) != hashes

    (root / ".complete").write_text("{not json")
    ensure_builtin(root, seed=1, workers=1, **TINY)
    assert "generating" in capsys.readouterr().out and json.loads((root / ".complete").read_text())


def test_two_runs_at_once_generate_once_and_neither_sees_the_folder_replaced(tmp_path, monkeypatch):
    root, calls, seen = tmp_path / "builtin", [], []
    generate = builtin.generate_builtin

    def slow_generate(*args, **kwargs):  # a generation long enough for the second run to arrive during it
        calls.append(1)
        time.sleep(0.5)
        return generate(*args, **kwargs)

    monkeypatch.setattr(builtin, "generate_builtin", slow_generate)

    def run():
        ensure_builtin(root, seed=0, workers=1, **TINY)
        seen.append(_hashes(root))

    runs = [threading.Thread(target=run) for _ in range(2)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    assert len(calls) == 1 and len(seen) == 2 and seen[0] == seen[1]


def test_partial_folders_are_replaced(tmp_path):
    root = tmp_path / "builtin"
    (root / "images").mkdir(parents=True)
    (root / "junk.txt").write_text("left by an interrupted run")
    dead = tmp_path / "builtin.tmp-999999999"  # above any pid_max: no such process
    dead.mkdir()
    ensure_builtin(root, seed=0, workers=1, **TINY)
    assert not (root / "junk.txt").exists() and (root / ".complete").is_file()
    assert not dead.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["builtin"]


def test_interrupted_generation_leaves_no_complete_folder(tmp_path, monkeypatch):
    calls = []

    def failing_write(root, split, *args):
        calls.append(split)
        if split == 1:
            raise KeyboardInterrupt
        return write_split(root, split, *args)

    write_split = builtin._write_split
    monkeypatch.setattr(builtin, "_write_split", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_builtin(tmp_path / "builtin", seed=0, workers=1, **TINY)
    assert calls == [0, 1] and list(tmp_path.iterdir()) == []


def test_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError):
        generate_builtin(tmp_path / "x", num_train=1, num_val=1, min_size=128, max_size=96)
    assert not os.path.exists(tmp_path / "x")


def test_object_size_and_count_options(tmp_path):
    """data.builtin.object_size / max_objects (configs/data/builtin_large.yaml): digit heights within the given
    fractions of the shorter side (give or take the soft glyph's edge against its tight box), at most
    max_objects a image, and both in the fingerprint only when set (the default dataset keeps its folder)."""
    root = generate_builtin(tmp_path / "large", num_train=60, num_val=0, seed=0, min_size=96, max_size=128,
                            workers=1, object_size=(0.3, 0.6), max_objects=3)
    coco = _coco(root, "train")
    sides = {im["id"]: min(im["width"], im["height"]) for im in coco["images"]}
    heights = np.array([a["bbox"][3] / sides[a["image_id"]] for a in coco["annotations"]])
    assert heights.max() <= 0.6 * 1.2 and np.median(heights) >= 0.3 * 0.8 and heights.min() >= 0.15
    counts = np.array([len(b) for b in _boxes_by_image(coco).values()])
    assert counts.max() <= 3 and counts.mean() >= 1.0
    fingerprint = json.loads((root / ".complete").read_text())
    assert fingerprint["object_size"] == [0.3, 0.6] and fingerprint["max_objects"] == 3
    default = tmp_path / "default"
    ensure_builtin(default, seed=0, workers=1, **TINY)
    assert "object_size" not in json.loads((default / ".complete").read_text())


@pytest.mark.parametrize("bad, key", [({"object_size": (0.5, 0.2)}, "object_size"),
                                      ({"object_size": (0.0, 0.5)}, "object_size"),
                                      ({"max_objects": 0}, "max_objects")])
def test_rejects_bad_object_options(tmp_path, bad, key):
    from detkit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"data.builtin.{key}"):
        ensure_builtin(tmp_path / "x", seed=0, workers=1, **TINY, **bad)
    assert not os.path.exists(tmp_path / "x")
