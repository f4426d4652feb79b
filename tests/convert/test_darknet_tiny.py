"""Darknet's tiny models (yolov2-tiny, yolov3-tiny, yolov4-tiny) as detkit models: darknet's parameter counts,
their .weights loaded in cfg order giving the raw outputs and decoded boxes/scores of an independent
interpreter of the cfg (tests/convert/darknet_reference.py), the converter tool, and a training step."""

import pytest
import torch

import detkit
from detkit.app.build import build_model
from detkit.convert.checkpoint import convert_darknet
from detkit.convert.darknet import ConvertError, darknet_parameter_count, layout, load_weights
from detkit.models.layers import DarknetMaxPool
from tests.conftest import compose_config
from tests.convert.darknet_reference import (
    DarknetReference,
    decode_heads,
    yolov2_tiny_cfg,
    yolov3_tiny_cfg,
    yolov4_tiny_cfg,
)
from tests.convert.test_darknet import random_values, write_darknet

# Narrow versions: (configs/model name, reference cfg writer, width, overrides that scale the cfg's widths with it)
NARROW = {
    "yolov3_tiny": (yolov3_tiny_cfg, 4, ["model.backbone.width=4", "model.neck_channels=[64]",
                                         "model.head_channels=[64,128]"]),
    "yolov4_tiny": (yolov4_tiny_cfg, 8, ["model.backbone.width=8", "model.neck_channels=[64]",
                                         "model.head_channels=[64,128]"]),
    "yolov2_tiny": (yolov2_tiny_cfg, 4, ["model.backbone.width=4", "model.head_channels=[128]"]),
}


def narrow(name: str, num_classes: int = 3):
    return build_model(compose_config("train", [f"model={name}", *NARROW[name][2]]).model, num_classes)


def test_darknet_parameter_counts_of_the_tiny_models():
    # conv weights + biases + BN gamma/beta at 80 classes, as darknet prints them for the three cfgs
    counts = {"yolov3_tiny": 8_852_366, "yolov4_tiny": 6_056_606, "yolov2_tiny": 11_232_057}
    for name, count in counts.items():
        assert darknet_parameter_count(build_model(compose_config("train", [f"model={name}"]).model, 80)) == count


def test_darknet_maxpool_pads_with_minus_infinity_after_the_map():
    x = torch.randn(2, 3, 5, 7)
    for size, stride in [(2, 1), (2, 2), (3, 1), (3, 2)]:
        out = DarknetMaxPool(size, stride)(x)
        before = (size - 1) // 2
        rows, cols = (x.shape[2] - 1) // stride + 1, (x.shape[3] - 1) // stride + 1  # darknet's out_h, out_w
        assert out.shape == (2, 3, rows, cols)
        for i in range(rows):
            for j in range(cols):
                top, left = max(i * stride - before, 0), max(j * stride - before, 0)
                window = x[:, :, top:i * stride - before + size, left:j * stride - before + size]
                assert torch.equal(out[:, :, i, j], window.amax(dim=(2, 3)))


@pytest.mark.parametrize("name", list(NARROW))
def test_the_converted_tiny_model_computes_what_darknets_layers_compute(tmp_path, name):
    write_cfg, width, overrides = NARROW[name]
    path = write_darknet(tmp_path / f"{name}.weights", random_values(narrow(name), seed=4))
    convert_darknet(path, tmp_path / f"{name}.pt", name, 64, overrides, class_names=["a", "b", "c"])
    model = detkit.load(tmp_path / f"{name}.pt").model.eval()
    cfg = write_cfg(width, num_classes=3)
    reference = DarknetReference(cfg, path)  # reads every value itself
    for size in (64, 96):
        images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours = model.raw_outputs(images)  # per level (B, A, H, W, 5 + C), shallowest first
            heads = reference.forward(images)  # darknet's [yolo] / [region] inputs, deepest first
            boxes, scores = model.dense_predictions(images)
        assert len(ours) == len(heads)
        for a, b in zip(ours, heads[::-1]):
            batch, anchors, h, w, outputs = a.shape
            assert b.shape == (batch, anchors * outputs, h, w)
            torch.testing.assert_close(a.permute(0, 1, 4, 2, 3).reshape(b.shape), b, atol=1e-4, rtol=1e-4)
        # darknet's decoding (anchors by mask, scale_x_y, region anchors in cells, softmax classes)
        decoded = decode_heads(cfg, heads, (size, size))[::-1]
        ref_boxes = torch.cat([d[0].reshape(2, -1, 4) for d in decoded], dim=1)
        ref_scores = torch.cat([d[1].reshape(2, -1, 3) for d in decoded], dim=1)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-4)
        t_wh = torch.cat([o[..., 2:4].reshape(2, -1, 2) for o in ours], dim=1)
        unclamped = (t_wh <= 4).all(dim=-1)  # detkit clamps e^t at e^4; darknet does not
        assert unclamped.float().mean() > 0.9
        torch.testing.assert_close(boxes[unclamped], ref_boxes[unclamped], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", list(NARROW))
def test_the_converter_tools_config_takes_the_tiny_models(tmp_path, name):
    # what tools/convert.py does with its composed config (configs/convert.yaml), in-process
    model = narrow(name, num_classes=80)
    path = write_darknet(tmp_path / "tiny80.weights", random_values(model, seed=5))
    cfg = compose_config("convert", [f"model={name}", f"weights={path}", f"out={tmp_path / 'tiny80.pt'}",
                                     "img_size=96", *NARROW[name][2]])
    convert_darknet(cfg.weights, cfg.out, cfg.model, int(cfg.img_size))
    load_weights(model, path)
    converted = detkit.load(tmp_path / "tiny80.pt")
    assert converted.img_size == 96 and len(converted.class_names) == 80
    for (key, a), b in zip(converted.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_tiny_variant_without_a_cfg_is_refused():
    sam = build_model(compose_config("train", ["model=yolov3_tiny", "+model.sam=true"]).model, 3)
    with pytest.raises(ConvertError, match="no darknet cfg layout"):
        layout(sam)


@pytest.mark.parametrize("name", list(NARROW))
def test_a_tiny_model_trains_one_step(name):
    torch.manual_seed(0)
    model = build_model(compose_config("train", [f"model={name}"]).model, 3).train()
    images = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [5.0, 5.0, 20.0, 25.0]]),
                "labels": torch.tensor([0, 2])}]
    losses = model(images, targets)
    assert {"loss_box", "loss_obj", "loss_cls"} <= set(losses)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
