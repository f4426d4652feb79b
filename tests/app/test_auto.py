"""Data-adaptive defaults (detkit/app/auto.py): sizes and priors follow the data, are stored in the checkpoint,
never replace a value the user set, and leave the built-in main job as it is."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import detkit
from detkit.anchors import grid_iou_recall, iou_recall, ratio_recall
from detkit.app import auto
from detkit.app.auto import apply_auto, fill_sizes, named
from detkit.app.build import raw_dataset
from detkit.app.train import train
from detkit.data.check import check_dataset
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
COMPACT_ANCHORS = [[[10, 13], [14, 20], [20, 29]], [[29, 40], [40, 55], [55, 74]], [[77, 101], [106, 138], [149, 192]]]


def write_coco(root: Path, count: int, size: tuple[int, int], sides: tuple[float, float], seed: int = 0) -> list[str]:
    """``count`` noise images of ``size`` (h, w) with three square boxes each of side uniform in ``sides``;
    returns the data=coco overrides reading them (train and val the same files)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        h, w = size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for j in range(3):
            side = float(rng.uniform(*sides))
            x, y = float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side))
            annotations.append({"id": 3 * i + j + 1, "image_id": i + 1, "category_id": 1 + j % 2,
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0})
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return ["data=coco", f"data.train_json={ann}", f"data.train_images={root / 'img'}", f"data.val_json={ann}",
            f"data.val_images={root / 'img'}", "data.num_workers=0"]


def run_auto(cfg):
    lines = []
    changed = apply_auto(cfg, lambda: raw_dataset(cfg.data, "train"), lines.append)
    return changed, "\n".join(lines)


def test_recall_measures():
    wh = torch.tensor([[10.0, 10.0], [100.0, 10.0]])
    assert ratio_recall(wh, torch.tensor([[10.0, 10.0]])) == 0.5  # 100/10 is past the ratio 4
    assert ratio_recall(wh, torch.tensor([[30.0, 10.0]])) == 1.0
    assert iou_recall(wh, torch.tensor([[10.0, 10.0]]), 0.5) == 0.5
    # on a grid: a same-size prior 1.6x its stride misses a box between two cell centres (IoU 0.31 at half a
    # stride off in x and y); at 4x its stride it still overlaps it by 0.62; centred, both match
    box, prior = torch.tensor([[16.0, 16.0]]), torch.tensor([[16.0, 16.0]])
    assert iou_recall(box, prior, 0.5) == 1.0
    sparse = grid_iou_recall(box, prior, torch.tensor([10.0]), 0.5)
    assert 0.3 < sparse < 0.9
    assert grid_iou_recall(box, prior, torch.tensor([4.0]), 0.5) == 1.0
    assert grid_iou_recall(box, prior, torch.tensor([5.0]), 0.5) > sparse  # a finer stride covers more
    assert grid_iou_recall(torch.zeros(0, 2), prior, torch.tensor([4.0])) == 0.0
    assert named("model.anchors", ["model.anchors"]) and named("model.priors.min_sizes", ["model.priors"])
    assert not named("model.anchors", ["model.anchor_sizes", "data.img_size"])


def test_tiny_objects_get_small_priors_and_a_larger_test_size(tmp_path):
    tiny = compose_config("train", write_coco(tmp_path / "tiny", 12, (300, 340), (2.5, 3.5)))  # data=coco: sizes null
    changed, log = run_auto(tiny)
    assert tiny.data.img_size == 352 and tiny.data.test_size == 448  # 340 to a multiple of 32; 1.25x (small)
    anchors = torch.tensor(OmegaConf.to_container(tiny.model.anchors))
    assert anchors.shape == (3, 3, 2) and anchors.max() < 5 and changed["model.anchors"] == tiny.model.anchors
    assert re.search(r"best possible recall 0\.\d+ < 0\.98 at 352 px; fitted model\.anchors: recall 1\.0000", log)
    large = compose_config("train", write_coco(tmp_path / "large", 12, (300, 340), (60, 120)))
    changed, log = run_auto(large)
    assert large.data.img_size == large.data.test_size == 352
    assert OmegaConf.to_container(large.model.anchors) == COMPACT_ANCHORS and "model.anchors" not in changed
    # SSD's sizes, RetinaNet's, Fast R-CNN's dense proposals and G-CNN's grid follow the data too
    for model, key in (("ssdlite", "priors.min_sizes"), ("retinanet_cpu", "anchor_sizes"),
                       ("fast_rcnn_cpu", "proposals.sizes"), ("gcnn_cpu", "grid_scales")):
        cfg = compose_config("train", [*write_coco(tmp_path / model, 12, (300, 340), (4, 6)), f"model={model}"])
        before = OmegaConf.to_container(OmegaConf.select(cfg.model, key))
        before_ratios = OmegaConf.to_container(cfg.model.grid_ratios) if model == "gcnn_cpu" else None
        changed, _ = run_auto(cfg)
        assert changed[f"model.{key}"][0] < before[0] / 2
        if model == "fast_rcnn_cpu":  # the boxes' shape (square; its 2.0 is the digits' h/w), strides half the sizes
            sizes = changed["model.proposals.sizes"]
            assert changed["model.proposals.ratios"] == [1.0]
            assert all(abs(stride - size / 2) <= 0.55 for stride, size in zip(changed["model.proposals.stride"], sizes))
            assert min(sizes) >= 4  # DenseProposals drops narrower boxes: the fit does not count on them
        if model == "gcnn_cpu":  # its tall boxes (2.0: the digits' h/w) become the data's square ones
            assert before_ratios == [2.0] and changed["model.grid_ratios"] == [1.0]


def test_ssd_default_boxes_sparse_for_their_stride_are_refitted():
    # ssdlite_cpu's default boxes are about twice their map's stride: centred on tall 30-60 px wide objects (the
    # large digits' shape at 256 px) every object has one at IoU 0.5, at their cells' places a fifth do not
    model = OmegaConf.to_container(compose_config("train", ["model=ssdlite_cpu"]).model, resolve=True)
    width = torch.linspace(30, 60, 50)
    wh = torch.stack([width, 2 * width], dim=1)
    shapes = auto.SSD.shapes(model, 256)
    assert shapes.shape[1] == 3 and shapes[0, 2] == 8  # (w, h, stride): the first map's stride is 8 at any size
    assert iou_recall(wh, shapes[:, :2], 0.5) == 1.0
    before = auto.SSD.recall(wh, shapes, model)
    assert before < 0.85
    values, recall_before, recall_after = auto.fit_priors(auto.SSD, model, wh, 256, 0.98, 0)
    assert recall_before == before and recall_after > before + 0.05
    assert values["priors.min_sizes"][0] > model["priors"]["min_sizes"][0]


def test_fitted_priors_and_sizes_are_stored_and_reused_from_the_checkpoint(tmp_path):
    cfg = compose_config("train", [
        *write_coco(tmp_path / "data", 12, (96, 96), (2.5, 3.5)), "data.img_size=96", "data.batch_size=4",
        "data.eval_batch_size=4", "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]", "trainer.epochs=1",
        "trainer.threads=1", "eval.plots=false"])
    train(cfg, tmp_path / "run")
    detector = detkit.load(tmp_path / "run" / "last.pt")
    stored = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["config"]
    assert stored["data"]["img_size"] == 96 and stored["data"]["test_size"] == detector.img_size == 128
    assert stored["model"]["anchors"] != COMPACT_ANCHORS
    assert torch.equal(detector.model.anchors, torch.tensor(stored["model"]["anchors"]))
    assert detector.model.anchors.max() < 5


def test_a_value_the_user_set_is_never_replaced(tmp_path, monkeypatch):
    overrides = write_coco(tmp_path / "tiny", 12, (300, 340), (2.5, 3.5))
    own = [[[40, 40], [50, 50], [60, 60]]] * 3  # fits the tiny boxes badly, but it is the user's
    cfg = compose_config("train", [*overrides, f"model.anchors={own}", "data.img_size=416", "data.test_size=352"])
    changed, log = run_auto(cfg)
    assert changed == {} and OmegaConf.to_container(cfg.model.anchors) == own and cfg.data.test_size == 352
    assert cfg.data.img_size == 416
    # through tools/train.py a key on the command line is the user's, even at the config file's value
    monkeypatch.setattr(auto, "command_line_keys", lambda: ["model.anchors", "data.test_size"])
    cfg = compose_config("train", [*overrides, "data.img_size=416", "data.test_size=null"])
    changed, _ = run_auto(cfg)
    assert changed == {} and cfg.data.test_size is None and OmegaConf.to_container(cfg.model.anchors) == COMPACT_ANCHORS
    off = compose_config("train", [*overrides, "auto.priors=false", "auto.sizes=false"])
    assert run_auto(off) == ({}, "")


def test_a_grid_without_ratios_is_fitted_as_squares_and_named_ratios_stay(tmp_path, monkeypatch):
    overrides = [*write_coco(tmp_path / "tiny", 12, (300, 340), (4, 6)), "model=gcnn_cpu"]
    squares = compose_config("train", [*overrides, "model.grid_ratios=null"])  # older configs: no ratios
    changed, log = run_auto(squares)
    assert {k for k in changed if k.startswith("model.")} == {"model.grid_scales"} and squares.model.grid_ratios is None
    assert "fitted model.grid_scales:" in log
    monkeypatch.setattr(auto, "command_line_keys", lambda: ["model.grid_ratios"])  # the user's: nothing refit
    named_ratios = compose_config("train", [*overrides, "data.img_size=352", "data.test_size=352"])
    assert run_auto(named_ratios)[0] == {} and OmegaConf.to_container(named_ratios.model.grid_ratios) == [2.0]


def test_tools_that_read_a_user_dataset_choose_its_sizes_as_training_would(tmp_path):
    overrides = write_coco(tmp_path / "tiny", 12, (300, 340), (2.5, 3.5))
    trained = compose_config("train", overrides)
    run_auto(trained)
    data = compose_config("check_dataset", overrides).data
    assert data.img_size is None and fill_sizes(data, lambda: raw_dataset(data, "train"), log=lambda _: None) == {
        "data.img_size": trained.data.img_size, "data.test_size": trained.data.test_size}
    text, ok = check_dataset(compose_config("check_dataset", overrides).data, ["train"])
    assert ok and f"pixels of the {trained.data.img_size}² letterboxed input" in text
    # a size set stays; the built-in data is never touched
    data = compose_config("check_dataset", [*overrides, "data.img_size=256"]).data
    assert fill_sizes(data, lambda: raw_dataset(data, "train"), log=lambda _: None) == {"data.test_size": 320}
    builtin = compose_config("check_dataset").data
    assert fill_sizes(builtin, lambda: 1 / 0) == {}


def builtin_unchanged(cfg):
    before = OmegaConf.to_container(cfg)
    changed, log = run_auto(cfg)
    assert changed == {} and OmegaConf.to_container(cfg) == before
    return log


def test_the_builtin_main_job_is_left_as_it_is(tiny_builtin, tiny_overrides):
    # the default config on the built-in data: off for the built-in data, and its anchors fit even when on
    data_keys = [o for o in tiny_overrides if o.startswith("data.builtin.")]
    assert builtin_unchanged(compose_config("train", data_keys)) == ""
    log = builtin_unchanged(compose_config("train", [*data_keys, "auto.builtin=true"]))
    assert "auto priors: best possible recall of model.anchors 1.0000 at 384 px" in log


@pytest.mark.skipif(not (ROOT / "data/builtin/annotations/instances_train.json").exists(),
                    reason="the built-in data is generated by the main job")
def test_the_full_builtin_data_keeps_the_main_jobs_anchors():
    cfg = compose_config("train", [f"data.builtin.root={ROOT / 'data/builtin'}", "auto.builtin=true"])
    assert "best possible recall of model.anchors 0.9998 at 384 px" in builtin_unchanged(cfg)


def test_command_line_keys_are_hydras_value_overrides():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from tests.conftest import CONFIGS

    assert auto.command_line_keys() == []  # outside a Hydra app: none
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", ["data=coco", "augment@data.augment=yolo", "model.anchors=[[[4,4]]]",
                                "+auto.extra=1"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert auto.command_line_keys() == ["model.anchors", "auto.extra"]
    finally:
        HydraConfig.instance().cfg = None
