"""Darknet's yolov4.weights into model=yolov4: yolov4.cfg's parameters, its convolution order, its outputs and
its per-level ``scale_x_y`` box decoding, checked against the independent interpreter of
tests/convert/darknet_reference.py."""

import pytest
import torch
from hydra.errors import InstantiationException

import detkit
from detkit.app.build import build_model
from detkit.convert.checkpoint import convert_darknet
from detkit.convert.darknet import ConvertError, darknet_parameter_count, layout, load_weights
from tests.conftest import compose_config
from tests.convert.darknet_reference import DarknetReference, decode_heads, yolov4_cfg
from tests.convert.test_darknet import random_values, write_darknet
from tests.models.roi_common import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions: more threads only wait on a shared CPU

WIDTH, DEPTHS = 4, [1, 2, 1, 1, 1]  # narrow: Mish on every backbone conv
SMALL = [f"model.backbone.width={WIDTH}", f"model.backbone.depths=[{','.join(map(str, DEPTHS))}]"]


def small_yolov4(num_classes: int = 3, *overrides: str):
    return build_model(compose_config("train", ["model=yolov4", *SMALL, *overrides]).model, num_classes)


def test_yolov4_has_darknets_parameter_count_and_fills_a_yolov4_weights_file():
    model = build_model(compose_config("train", ["model=yolov4"]).model, 80)
    assert darknet_parameter_count(model) == 64_363_101  # darknet's count for yolov4.cfg at 80 classes
    # a file for yolov4.cfg: a 20-byte header and one float32 per value in layout order
    assert sum(unit.size for unit in layout(model)) * 4 + 20 == 257_717_640
    assert model.xy_scale == (1.2, 1.1, 1.05) and model.strides == [8, 16, 32]


def test_a_converted_small_yolov4_computes_what_darknets_layers_compute(tmp_path):
    model = small_yolov4(80)
    path = write_darknet(tmp_path / "small80.weights", random_values(model, seed=4))
    # what tools/convert.py source=darknet model=yolov4 … runs, with the width/depth overrides
    out = convert_darknet(path, tmp_path / "small80.pt", "yolov4", 96, SMALL)
    converted = detkit.load(out).model.eval()
    assert converted.nms == "nms"  # yolov4.cfg evaluates with greedy NMS (nms_kind=greedynms), not DIoU-NMS
    reference = DarknetReference(yolov4_cfg(WIDTH, DEPTHS, num_classes=80), path)  # reads every value itself
    for size in (64, 96):
        images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours = converted.raw_outputs(images)  # per level (B, A, H, W, 5 + C), shallowest first
            theirs = reference.forward(images)  # yolov4.cfg's [yolo] layers come shallowest first too
        assert len(ours) == len(theirs) == 3
        for level, (a, b) in enumerate(zip(ours, theirs)):
            batch, anchors, h, w, outputs = a.shape
            assert b.shape == (batch, anchors * outputs, h, w) and h == size // (8 * 2**level)
            torch.testing.assert_close(a.permute(0, 1, 4, 2, 3).reshape(b.shape), b, atol=1e-4, rtol=1e-4)


def test_decoded_boxes_follow_darknets_scale_x_y_per_level(tmp_path):
    model = small_yolov4()
    path = write_darknet(tmp_path / "small.weights", random_values(model, seed=5))
    load_weights(model, path)
    model.eval()
    cfg = yolov4_cfg(WIDTH, DEPTHS, num_classes=3)
    reference = DarknetReference(cfg, path)
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model.raw_outputs(images)
        ours = model.decode(outputs)  # xyxy input pixels
        decoded = decode_heads(cfg, reference.forward(images), (64, 96))  # per [yolo] layer, darknet's way
    theirs = [torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], dim=-1) for b, _ in decoded]
    for level, (xyxy, xywh, raw) in enumerate(zip(ours, theirs, outputs)):
        torch.testing.assert_close((xyxy[..., :2] + xyxy[..., 2:]) / 2, xywh[..., :2], atol=1e-4, rtol=1e-5)
        unclamped = raw[..., 2:4] < 4.0  # detkit caps e^t at e^4 against inf boxes from untrained heads
        size = xyxy[..., 2:] - xyxy[..., :2]
        torch.testing.assert_close(size[unclamped], xywh[..., 2:][unclamped], atol=1e-4, rtol=1e-5)
        # the formula itself, b_x = (σ(t)·s − (s − 1)/2 + c)·stride, with s = 1.2, 1.1, 1.05 per level
        s, stride = (1.2, 1.1, 1.05)[level], (8, 16, 32)[level]
        column = torch.arange(xyxy.shape[3]).view(1, 1, 1, -1)
        expected = (raw[..., 0].sigmoid() * s - (s - 1) / 2 + column) * stride
        torch.testing.assert_close((xyxy[..., 0] + xyxy[..., 2]) / 2, expected, atol=1e-4, rtol=1e-5)


def test_a_per_level_xy_scale_needs_one_value_per_level_and_yolov4_variants_off_the_cfg_are_refused():
    with pytest.raises(InstantiationException, match="xy_scale has 2 values for 3 levels"):
        small_yolov4(3, "model.xy_scale=[1.2,1.1]")
    assert small_yolov4(3, "model.xy_scale=1.05").xy_scale == (1.05, 1.05, 1.05)
    for off_cfg in ("model.neck.lateral=false", "model.spp_pairs=0", "model.backbone.wide_first_stage=false",
                    "model.sam=true"):
        with pytest.raises(ConvertError, match="not yolov4.cfg's layout"):
            layout(small_yolov4(3, off_cfg))
