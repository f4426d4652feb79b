import json
import math
import runpy
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights, ssdlite320_mobilenet_v3_large

from benchmarks.parity_benchmark import PAIRS, pair_config, pair_overrides, run_pair, torchvision_model
from benchmarks.peer_benchmark import ROOT
from detkit.app.build import build_model
from detkit.errors import ConfigError


def parity_overrides(tiny_overrides: list[str]) -> list[str]:
    """The tiny built-in data at 64 px, batches of 8 (3 steps an epoch), one thread."""
    data = [o for o in tiny_overrides if o.startswith("data.builtin.")]
    return [*data, "data.img_size=64", "data.batch_size=8", "data.eval_batch_size=8", "trainer.threads=1"]


@pytest.fixture(scope="module")
def parity_run(tiny_overrides, tmp_path_factory):
    """``tools/benchmark.py parity --epochs 1`` over every pair on the tiny data: (its JSON, its markdown)."""
    out = tmp_path_factory.mktemp("parity")
    argv = ["benchmark.py", "parity", "--epochs", "1", "--pairs", ",".join(PAIRS), "--out", str(out),
            *parity_overrides(tiny_overrides)]
    saved, sys.argv = sys.argv, argv
    try:
        runpy.run_path(str(ROOT / "tools" / "benchmark.py"), run_name="__main__")
    finally:
        sys.argv = saved
    return json.loads((out / "parity.json").read_text()), (out / "parity.md").read_text()


def test_the_command_writes_both_sides_ap_for_each_pair(parity_run):
    result, table = parity_run
    assert [r["pair"] for r in result["rows"]] == list(PAIRS)
    for row in result["rows"]:
        ours, theirs = row["detkit"], row["torchvision"]
        assert ours["name"].startswith("detkit") and theirs["name"].startswith("torchvision")
        for side in (ours, theirs):
            assert 0.0 <= side["AP"] <= side["AP50"] <= 1.0
        line = next(line for line in table.splitlines() if line.startswith(f"| {row['pair']} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[3:5] == [f"{ours['AP']:.4f}", f"{theirs['AP']:.4f}"]
        assert cells[6:8] == [f"{ours['AP50']:.4f}", f"{theirs['AP50']:.4f}"]
        assert cells[5] == row["AP_ratio"] and cells[8] == row["AP50_ratio"]
    assert "1 epochs" in table.splitlines()[0]


def test_both_sides_see_the_same_images_steps_and_pixels(parity_run):
    result, _ = parity_run
    for row in result["rows"]:
        ours, theirs = row["detkit"], row["torchvision"]
        assert ours["steps"] == theirs["steps"] == 3  # 24 images in batches of 8, one epoch
        assert ours["images"] == theirs["images"] == 24
        assert ours["pixel_sum"] == theirs["pixel_sum"] > 0
        assert ours["skipped"] == theirs["skipped"] == 0
        assert row["img_size"] == 64 and row["batch_size"] == 8


def test_the_two_stage_pairs_have_the_same_parameters_on_resnet18(parity_run):
    result, _ = parity_run
    for row in result["rows"]:
        assert row["detkit"]["params"] == row["torchvision"]["params"], row["pair"]


def test_a_minutes_budget_gives_each_side_the_same_wall_time(tiny_overrides):
    minutes = 0.002
    row = run_pair("ssdlite", parity_overrides(tiny_overrides), minutes=minutes, log=lambda _: None)
    for side in (row["detkit"], row["torchvision"]):
        assert side["train_seconds"] >= minutes * 60 and side["steps"] >= 1
        assert side["images"] == 8 * side["steps"] and math.isfinite(side["AP"])


def test_torchvision_model_trained_on_detkit_labels_predicts_detkit_labels():
    torch.manual_seed(0)
    cfg = pair_config("ssdlite", ["data.img_size=64"])
    theirs = torchvision_model("ssdlite", cfg, 3, build_model(cfg.model, 3))
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 56.0, 56.0]]), "labels": torch.tensor([2])}] * 2
    optimizer = torch.optim.Adam(theirs.parameters(), 3e-3)
    theirs.train()
    for _ in range(8):
        loss = sum(theirs(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    theirs.eval()
    with torch.no_grad():
        detections = theirs(images)
    for det in detections:
        assert det["labels"].min() >= 0 and det["labels"].max() <= 2  # never torchvision's 1..3
        assert det["labels"][det["scores"].argmax()] == 2  # the only class it saw


def test_ssdlite_mnv3_has_torchvision_ssdlite_parameter_count():
    cfg = OmegaConf.load(ROOT / "configs" / "model" / "ssdlite_mnv3.yaml")
    published = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1.meta["num_params"]  # of the 91-output COCO model
    for classes in (90, 3):
        ours = build_model(cfg, classes).eval()
        theirs = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes + 1).eval()
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters())
        if classes == 90:
            assert count == published
        assert [m.shape[1:] for m in ours.backbone(torch.zeros(1, 3, 320, 320))] == \
            [m.shape[1:] for m in theirs.backbone(torch.zeros(1, 3, 320, 320)).values()]


def test_ssdlite_mnv3_default_boxes_are_torchvisions():
    from torchvision.models.detection.image_list import ImageList

    cfg = OmegaConf.load(ROOT / "configs" / "model" / "ssdlite_mnv3.yaml")
    ours = build_model(cfg, 3).eval()
    theirs = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.zeros(1, 3, 320, 320)
    maps = list(theirs.backbone(x).values())
    expected = theirs.anchor_generator(ImageList(x, [(320, 320)]), maps)[0]
    got = ours.default_boxes((320, 320), [m.shape[-2:] for m in ours.backbone(x)])
    assert got.shape == expected.shape == (3234, 4)
    assert torch.allclose(got, expected, atol=1e-3)


def test_ssdlite_mnv3_initialises_and_normalises_as_torchvision():
    cfg = OmegaConf.load(ROOT / "configs" / "model" / "ssdlite_mnv3.yaml")
    ours = build_model(cfg, 3)
    head_weights = torch.cat([m.weight.flatten() for m in ours.head.modules() if isinstance(m, torch.nn.Conv2d)])
    assert head_weights.std().item() == pytest.approx(0.03, rel=0.05)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 0.001 and m.momentum == 0.03 for m in norms)


def test_an_unknown_pair_or_a_non_torchvision_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown parity pair 'yolo'"):
        pair_config("yolo")
    cfg = pair_config("fpn_rcnn", ["model.backbone.width=16"])
    with pytest.raises(ConfigError, match="standard ResNet"):
        torchvision_model("fpn_rcnn", cfg, 3, build_model(cfg.model, 3))


def test_a_pair_prefixed_override_applies_to_that_pair_only():
    overrides = ["data.img_size=96", "retinanet:model.head_norm=gn", "fpn_rcnn:model.roi_batch=64"]
    assert pair_overrides("retinanet", overrides) == ["data.img_size=96", "model.head_norm=gn"]
    retinanet, rcnn, ssdlite = (pair_config(p, overrides) for p in ("retinanet", "fpn_rcnn", "ssdlite"))
    assert retinanet.model.head_norm == "gn" and rcnn.model.roi_batch == 64
    assert retinanet.data.img_size == rcnn.data.img_size == ssdlite.data.img_size == 96
    assert "roi_batch" not in ssdlite.model  # the plain run would stop on a key its model lacks
    assert pair_overrides("ssdlite", ["data.train_json=C:/sets/a.json"]) == ["data.train_json=C:/sets/a.json"]
    with pytest.raises(ConfigError, match="unknown parity pair 'yolo'"):
        pair_overrides("ssdlite", ["yolo:model.anchors=[]"])
