"""The pieces that define each YOLO version, checked directly."""

import math

import pytest
import torch
import torchvision

import detkit.postprocess
from detkit.losses.yolo import match_anchors
from detkit.models.backbones.cspdarknet import CSPDarknet
from detkit.models.backbones.darknet import Darknet
from detkit.models.backbones.darknet19 import Darknet19
from detkit.models.detectors.yolo import YOLOv3
from detkit.models.layers import DropBlock2d, SpatialAttention, space_to_depth
from detkit.models.necks.pan import PANet
from detkit.models.necks.passthrough import Passthrough
from detkit.models.necks.spp import SPP, SPPBlock

V3_ANCHORS = [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]], [[116, 90], [156, 198], [373, 326]]]


def test_spp_concatenates_input_and_three_pools_into_four_times_the_channels():
    x = torch.rand(2, 8, 13, 11)
    out = SPP((5, 9, 13))(x)
    assert out.shape == (2, 32, 13, 11)
    # darknet's order (route -1,-3,-5,-6): the largest pool first, the input last
    assert torch.equal(out[:, 24:], x)
    assert torch.equal(out[:, 16:24], torch.nn.functional.max_pool2d(x, 5, 1, 2))
    assert torch.equal(out[:, :8], torch.nn.functional.max_pool2d(x, 13, 1, 6))
    block = SPPBlock(16)
    assert block.out_channels == 32 and block(torch.rand(1, 16, 4, 4)).shape == (1, 32, 4, 4)
    darknet = SPPBlock(16, pairs=1)  # yolov3-spp.cfg / yolov4.cfg: 1x1, 3x3, 1x1 before the pools
    assert [m[0].kernel_size for m in [darknet.reduce, *darknet.convs]] == [(1, 1), (3, 3), (1, 1)]
    assert darknet(torch.rand(1, 16, 4, 4)).shape == (1, 32, 4, 4)


def test_pan_keeps_each_level_size_with_its_channels():
    features = [torch.rand(2, 16, 16, 12), torch.rand(2, 32, 8, 6), torch.rand(2, 64, 4, 3)]
    pan = PANet([16, 32, 64], [8, 16, 32], pairs=1)
    assert [tuple(o.shape) for o in pan(features)] == [(2, 8, 16, 12), (2, 16, 8, 6), (2, 32, 4, 3)]
    assert pan.out_channels == [8, 16, 32]


def test_reorg_moves_each_2x2_patch_into_channels_and_passthrough_fuses_one_level():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    out = space_to_depth(x, 2)
    assert out.shape == (1, 8, 2, 3)
    # channel c·4 + 2·i + j at (y, x) is input channel c at (2y + i, 2x + j)
    assert out[0, 1 * 4 + 2 * 1 + 0, 1, 2] == x[0, 1, 3, 4]
    neck = Passthrough([16, 32], [24], reorg_channels=4)
    fused = neck([torch.rand(2, 16, 8, 6), torch.rand(2, 32, 4, 3)])
    assert len(fused) == 1 and fused[0].shape == (2, 24, 4, 3)


def test_yolov2_has_one_level_and_direct_location_decoding():
    model = YOLOv3(3, Darknet19(depths=(1, 1, 1, 1, 1, 1), width=4), [[[20, 30], [40, 40]]], neck_channels=[16],
                   neck=lambda **kw: Passthrough(**kw, reorg_channels=4), level_weights=[1.0])
    assert model.strides == [32]
    outputs = model.raw_outputs(torch.zeros(1, 3, 96, 64))
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 3, 2, 8)]
    t = torch.zeros_like(outputs[0])
    t[0, 1, 2, 1, :4] = torch.tensor([math.log(1 / 3), 0.0, math.log(2.0), 0.0])  # σ(tx) = 0.25, e^{tw} = 2
    box = model.decode([t])[0][0, 1, 2, 1]
    cx, cy = (0.25 + 1) * 32, (0.5 + 2) * 32  # b = σ(t) + c, in cells, times the stride
    assert torch.allclose(box, torch.tensor([cx - 40, cy - 20, cx + 40, cy + 20]))


def test_yolov3_gives_each_gt_its_best_anchor_among_three_scales():
    anchors = torch.tensor(V3_ANCHORS, dtype=torch.float32)
    gt_wh = torch.tensor([[11.0, 14.0], [60.0, 44.0], [350.0, 300.0]])
    match = match_anchors(gt_wh, anchors, ratio_thresh=1.0)  # ratio 1: the best-IoU anchor only
    assert match.sum().item() == 3
    assert [tuple(i.tolist()) for i in match.nonzero()] == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]


def test_backbone_channels_and_strides():
    darknet53 = Darknet(depths=(1, 2, 8, 8, 4), width=32)
    assert darknet53.out_channels == [256, 512, 1024] and darknet53.strides == [8, 16, 32]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in darknet53.modules())
    assert n_convs == 52
    darknet19 = Darknet19()
    assert darknet19.out_channels == [512, 1024] and darknet19.strides == [16, 32]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in darknet19.modules()) == 18
    csp = CSPDarknet(depths=(1, 1, 1, 1, 1), width=4)
    maps = csp(torch.zeros(1, 3, 64, 32))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 8, 4), (1, 64, 4, 2), (1, 128, 2, 1)]
    assert any(isinstance(m, torch.nn.Mish) for m in csp.modules())


def test_sam_and_dropblock_keep_shapes_and_dropblock_is_identity_in_eval():
    x = torch.rand(4, 8, 16, 16)
    assert SpatialAttention(8)(x).shape == x.shape
    drop = DropBlock2d(0.2, 3)
    torch.manual_seed(0)
    dropped = drop(x)
    assert dropped.shape == x.shape and 0.05 < (dropped == 0).float().mean() < 0.4
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError):
        DropBlock2d(0.1, 2)


def test_model_options_add_spp_sam_dropblock_and_diou_nms(monkeypatch):
    backbone = Darknet(depths=(1, 1, 1, 1), width=4, stem_stride=2, num_outputs=3)
    anchors = [[[8, 11]], [[24, 33]], [[64, 84]]]
    plain = YOLOv3(3, backbone, anchors, neck_pairs=0)
    assert plain.spp is None and plain.sam is None and plain.dropblock is None and plain.nms == "nms"
    model = YOLOv3(3, backbone, anchors, neck_pairs=0, spp=True, sam=True, dropblock=0.1, nms="diou")
    assert isinstance(model.spp, SPPBlock) and len(model.sam) == 3
    called = []

    def spy(*args):
        called.append(True)
        return torchvision.ops.batched_nms(*args)

    monkeypatch.setattr(detkit.postprocess, "batched_diou_nms", spy)
    model.eval()(torch.rand(1, 3, 64, 64))
    assert called
    with pytest.raises(ValueError, match="unknown nms"):
        YOLOv3(3, backbone, anchors, nms="soft")
