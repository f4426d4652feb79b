"""The shared Fast R-CNN RoI head: pooling kinds, head shapes, RoI sampling, the multi-task loss, detections."""

import pytest
import torch
from torchvision.ops import box_iou

from detkit.boxes import DeltaCoder
from detkit.models.roi_heads import (
    FAST_RCNN_WEIGHTS,
    RoIBoxHead,
    SingleLevelPooler,
    roi_detections,
    roi_head_loss,
    sample_rois,
)

GT = torch.tensor([[0.0, 0.0, 100.0, 100.0]])


def shifted(shifts):
    """Copies of GT shifted right by each d: IoU (100 − d) / (100 + d)."""
    return torch.tensor([[d, 0.0, 100.0 + d, 100.0] for d in shifts])


def test_roi_pool_takes_the_max_roi_align_the_average():
    # Feature value = column index: over the whole map, max pooling gives the last column, bilinear the middle.
    features = torch.arange(8.0).repeat(1, 1, 8, 1)
    rois = [torch.tensor([[0.0, 0.0, 128.0, 128.0]])]
    pooled = SingleLevelPooler("roi_pool", output_size=1, spatial_scale=1 / 16)(features, rois, [(128, 128)])
    aligned = SingleLevelPooler("roi_align", output_size=1, spatial_scale=1 / 16)(features, rois, [(128, 128)])
    assert pooled.shape == aligned.shape == (1, 1, 1, 1)
    assert pooled.item() == 7.0
    assert aligned.item() == pytest.approx(3.5, abs=0.3)
    # Caffe's quantisation: the end pixel is inclusive, so 0–112 px spans map columns 0–7, split 0–3 | 4–7.
    whole = [torch.tensor([[0.0, 0.0, 112.0, 112.0]])]
    two_by_two = SingleLevelPooler("roi_pool", output_size=2)({"c5": features}, whole, [(128, 128)])
    assert two_by_two[0, 0].tolist() == [[3.0, 7.0], [3.0, 7.0]]
    with pytest.raises(ValueError, match="unknown RoI pooler 'roi_warp'"):
        SingleLevelPooler("roi_warp")
    with pytest.raises(ValueError, match="RoIs for 2 images but features for 1"):
        SingleLevelPooler()(features, rois * 2, [(128, 128)] * 2)


def test_box_head_shapes_and_rois_in_image_order():
    head = RoIBoxHead(SingleLevelPooler("roi_align", 7, 1 / 16), in_channels=4, pool_size=7, num_classes=3,
                      representation=32)
    features = torch.rand(2, 4, 8, 8)
    rois = [torch.tensor([[0.0, 0.0, 64.0, 64.0]] * 5), torch.tensor([[10.0, 20.0, 90.0, 100.0]] * 2)]
    logits, deltas = head(features, rois, [(128, 128)] * 2)
    assert logits.shape == (7, 4) and deltas.shape == (7, 12)
    # The last two rows come from image 1's map: changing image 0 leaves them unchanged.
    features2 = features.clone()
    features2[0] += 1
    logits2, _ = head(features2, rois, [(128, 128)] * 2)
    assert torch.allclose(logits2[5:], logits[5:]) and not torch.allclose(logits2[:5], logits[:5])


def test_a_background_regressor_adds_parameters_but_not_outputs():
    torch.manual_seed(0)
    plain = RoIBoxHead(SingleLevelPooler("roi_align", 7, 1 / 16), 4, 7, 3, representation=32)
    torch.manual_seed(0)
    parity = RoIBoxHead(SingleLevelPooler("roi_align", 7, 1 / 16), 4, 7, 3, representation=32, background_box=True)
    assert parity.bbox_pred.out_features == 16 and plain.bbox_pred.out_features == 12
    with torch.no_grad():
        parity.bbox_pred.weight[:12].copy_(plain.bbox_pred.weight)
    features, rois = torch.rand(1, 4, 8, 8), [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    (_, a), (_, b) = plain(features, rois, [(128, 128)]), parity(features, rois, [(128, 128)])
    assert b.shape == (1, 12) and torch.allclose(a, b)


def test_sampling_fractions_and_thresholds():
    # IoU ≥ 0.5 for d ≤ 33; in [0.1, 0.5) for 34 ≤ d ≤ 81; below 0.1 beyond (never sampled).
    rois = shifted(list(range(0, 34)) + list(range(34, 82)) + list(range(90, 100)))
    targets = [{"boxes": GT, "labels": torch.tensor([2])}]
    gen = torch.Generator().manual_seed(0)
    sampled, labels, deltas = sample_rois([rois], targets, batch_per_image=32, fg_fraction=0.25,
                                          append_gt=False, num_classes=3, generator=gen)
    iou = box_iou(sampled[0], GT)[:, 0]
    fg = labels < 3
    assert len(sampled[0]) == 32 and int(fg.sum()) == 8  # 25% of 32
    assert (labels[fg] == 2).all() and (labels[~fg] == 3).all()
    assert (iou[fg] >= 0.5).all() and ((iou[~fg] >= 0.1) & (iou[~fg] < 0.5)).all()
    # Regression targets decode back onto the ground truth; background targets are zero.
    coder = DeltaCoder(FAST_RCNN_WEIGHTS)
    assert torch.allclose(coder.decode(deltas[fg], sampled[0][fg]), GT.expand(8, 4), atol=1e-4)
    assert (deltas[~fg] == 0).all()
    # Few foreground candidates: all of them, background fills the rest; append_gt adds the GT itself.
    sampled, labels, _ = sample_rois([shifted([0, 40, 50, 60])], targets, batch_per_image=8, num_classes=3)
    assert len(sampled[0]) == 5 and int((labels < 3).sum()) == 2
    assert any(torch.equal(b, GT[0]) for b in sampled[0])


def test_sampling_without_objects_trains_background():
    rois = shifted([0, 10, 20])
    sampled, labels, _ = sample_rois([rois], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}],
                                     batch_per_image=4, num_classes=5)
    assert len(sampled[0]) == 3 and (labels == 5).all()
    with pytest.raises(ValueError, match="bg_iou"):
        sample_rois([rois], [{"boxes": GT, "labels": torch.tensor([0])}], bg_iou=(0.1, 0.7), num_classes=1)


def test_loss_uses_the_ground_truth_class_regressor_of_foreground_rois_only():
    labels = torch.tensor([1, 3, 0])  # K = 3: RoI 1 is background
    targets = torch.tensor([[0.5, -0.5, 0.2, 0.0], [9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    logits = torch.full((3, 4), -20.0)
    logits[torch.arange(3), labels] = 20.0
    deltas = torch.randn(3, 12) * 5
    deltas[0, 4:8] = targets[0]
    deltas[2, 0:4] = targets[2]
    losses = roi_head_loss(logits, deltas, labels, targets)
    assert losses["loss_cls"] < 1e-6 and losses["loss_box"] == 0
    deltas[2, 0] = 2.0  # off by 2 on one coordinate: smooth-L1 2 − 0.5, over R = 3 RoIs
    assert roi_head_loss(logits, deltas, labels, targets)["loss_box"].item() == pytest.approx(1.5 / 3)
    with pytest.raises(ValueError, match=r"box_deltas must be \(R, 4K\)"):
        roi_head_loss(logits, deltas[:, :8], labels, targets)


def test_detections_decode_each_class_with_its_regressor_and_clip():
    rois = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 200.0, 90.0]]), torch.tensor([[0.0, 0, 8, 8]])]
    logits = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])  # K = 2; RoI 2 is background
    deltas = torch.zeros(3, 8)
    deltas[0, 4:8] = DeltaCoder(FAST_RCNN_WEIGHTS).encode(torch.tensor([[20.0, 10.0, 60.0, 50.0]]), rois[0][:1])
    dets = roi_detections(logits, deltas, rois, [(100, 100), (100, 100)], score_threshold=0.5)
    assert dets[0]["labels"].tolist() == [1, 0] and len(dets[1]["boxes"]) == 0
    assert torch.allclose(dets[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 50.0], [60.0, 60.0, 100.0, 90.0]]),
                          atol=1e-3)
    assert (dets[0]["scores"] > 0.99).all()
