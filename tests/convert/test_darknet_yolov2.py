"""Darknet's yolov2.cfg in detkit (model=yolov2): darknet's parameter count, its old [reorg], its .weights order,
and the [region] layer's boxes and softmax scores, against tests/convert/darknet_reference.py."""

import pytest
import torch

import detkit
from detkit.app.build import build_model
from detkit.convert.checkpoint import convert_darknet
from detkit.convert.darknet import DARKNET_BN_EPS, ConvertError, darknet_parameter_count, layout
from detkit.models.layers import darknet_reorg
from tests.conftest import compose_config
from tests.convert.darknet_reference import DarknetReference, decode_heads, yolov2_cfg
from tests.convert.darknet_reference import darknet_reorg as reference_reorg
from tests.convert.test_darknet import random_values, write_darknet

WIDTH = 4  # yolov2.cfg at 1/8 width: 1024 → 128 channels, the reorg's 64 → 8
NARROW = [f"model.backbone.width={WIDTH}", f"model.neck.reorg_channels={2 * WIDTH}",
          f"model.head_channels=[{32 * WIDTH}]"]


def yolov2(overrides=(), num_classes: int = 80):
    return build_model(compose_config("train", ["model=yolov2", *overrides]).model, num_classes)


def test_yolov2_has_darknets_parameter_count_and_file_size():
    model = yolov2()
    assert darknet_parameter_count(model) == 50_962_889  # darknet's count for yolov2.cfg at 80 classes
    units = layout(model)
    assert len(units) == 23 and units[-1].bn is None and units[-1].conv.out_channels == 5 * 85
    # the published yolov2.weights is 203,934,260 bytes: a 16-byte header (int32 `seen`) and these floats
    assert sum(unit.size for unit in units) == (203_934_260 - 16) // 4


def test_detkits_darknet_reorg_is_the_references_and_not_pixel_unshuffle():
    x = torch.randn(2, 12, 6, 4, generator=torch.Generator().manual_seed(0))
    ours = darknet_reorg(x, 2)
    assert ours.shape == (2, 48, 3, 2)
    assert torch.equal(ours, reference_reorg(x, 2))
    assert not torch.equal(ours, torch.nn.functional.pixel_unshuffle(x, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        darknet_reorg(torch.zeros(1, 6, 4, 4), 2)


def test_the_converted_yolov2_computes_darknets_region_outputs(tmp_path):
    model = yolov2(NARROW)
    path = write_darknet(tmp_path / "narrow.weights", random_values(model, seed=4), major=0, minor=1, seen=64000)
    out = tmp_path / "narrow.pt"
    convert_darknet(path, out, "yolov2", 96, NARROW)  # what tools/convert.py model=yolov2 runs
    stored = torch.load(out, weights_only=True)
    assert stored["config"]["model"]["class_softmax"] is True and stored["converted_from"]["seen"] == 64000
    detector = detkit.load(out)
    converted = detector.model.eval()
    assert all(m.eps == DARKNET_BN_EPS for m in converted.modules() if isinstance(m, torch.nn.BatchNorm2d))
    cfg = yolov2_cfg(WIDTH, num_classes=80)
    reference = DarknetReference(cfg, path)  # reads every value itself
    for size in ((64, 64), (96, 64)):  # (H, W); the non-square one checks the reorg's row/column order
        images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            (raw,) = converted.raw_outputs(images)  # (B, A, H, W, 85)
            (theirs,) = reference.forward(images)  # (B, A·85, H, W)
            boxes, scores = converted.dense_predictions(images)
        batch, anchors, h, w, outputs = raw.shape
        assert theirs.shape == (batch, anchors * outputs, h, w) == (2, 425, size[0] // 32, size[1] // 32)
        torch.testing.assert_close(raw.permute(0, 1, 4, 2, 3).reshape(theirs.shape), theirs, atol=1e-4, rtol=1e-4)
        assert raw[..., 2:4].abs().max() < 4  # below detkit's e^t clamp, so darknet's unclamped boxes compare
        ((ref_boxes, ref_scores),) = decode_heads(cfg, [theirs], size)  # (B, A, H, W, ·): darknet's memory order
        ref_boxes, ref_scores = ref_boxes.reshape(batch, -1, 4), ref_scores.reshape(batch, -1, outputs - 5)
        torch.testing.assert_close(boxes, ref_boxes, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-4)
        # softmax, not sigmoids: every location's class probabilities sum to its objectness
        torch.testing.assert_close(scores.sum(-1), raw[..., 4].sigmoid().reshape(batch, -1))


def test_yolov2_variants_without_darknets_layers_have_no_layout():
    for overrides in (["model.neck.reorg=pixel_unshuffle"], ["model.neck.fuse=true"]):
        with pytest.raises(ConvertError, match="YOLOv2 variant .* no darknet cfg layout"):
            layout(yolov2([*NARROW, *overrides]))
    with pytest.raises(ConvertError, match="no darknet cfg layout"):
        layout(build_model(compose_config("train", ["model=yolov2_cpu"]).model, 80))
    with pytest.raises(Exception, match="unknown reorg 'shuffle'"):  # Hydra wraps the ValueError
        yolov2([*NARROW, "model.neck.reorg=shuffle"])




def test_yolov2_trains_its_softmax_classes_with_cross_entropy():
    torch.manual_seed(0)
    model = yolov2(NARROW, num_classes=3).train()
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}]
    losses = model(torch.rand(1, 3, 64, 64), targets)
    assert model.loss.class_softmax and all(torch.isfinite(v) for v in losses.values())
    losses["loss_cls"].backward()
    grad = model.heads[0][1].bias.grad.view(5, 8)  # 5 anchors × (4 box, objectness, 3 classes)
    assert grad[:, 5:].abs().sum() > 0
    # cross-entropy through a softmax: each anchor's class-logit gradients sum to zero
    torch.testing.assert_close(grad[:, 5:].sum(dim=1), torch.zeros(5), atol=1e-7, rtol=0)
