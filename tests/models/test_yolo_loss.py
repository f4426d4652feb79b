import torch

from detkit.losses.yolo import YOLOLoss, match_anchors

ANCHORS = torch.tensor([[[10.0, 10.0], [20.0, 20.0]], [[40.0, 40.0], [80.0, 80.0]]])


def test_match_by_shape_ratio_and_best_anchor_fallback():
    gt = torch.tensor([[12.0, 12.0], [300.0, 10.0]])
    match = match_anchors(gt, ANCHORS, ratio_thresh=4.0)
    assert match.shape == (2, 2, 2)
    assert match[0].tolist() == [[True, True], [True, False]]  # 12 vs 80: ratio 6.7 > 4
    # An extreme shape matches nothing by ratio but keeps its best-IoU anchor.
    assert match[1].sum() == 1


def test_neighbor_cells_add_the_two_nearest_adjacent_cells():
    loss = YOLOLoss(3, neighbor_cells=True)
    grid_xy = torch.tensor([[2.2, 3.8], [0.1, 0.2]])  # second centre sits in the corner cell
    gt, anchor, gx, gy = loss.assign_cells(grid_xy, torch.tensor([0, 1]), torch.tensor([1, 0]), w=5, h=5)
    cells = sorted(zip(gt.tolist(), gx.tolist(), gy.tolist()))
    assert cells == [(0, 1, 3), (0, 2, 3), (0, 2, 4), (1, 0, 0)]
    assert anchor[gt == 0].eq(1).all()
    plain = YOLOLoss(3).assign_cells(grid_xy, torch.tensor([0, 1]), torch.tensor([1, 0]), w=5, h=5)
    assert plain[2].tolist() == [2, 0] and plain[3].tolist() == [3, 0]


def test_class_softmax_trains_classes_with_cross_entropy_at_the_responsible_prediction():
    outputs = torch.randn(1, 2, 4, 4, 5 + 3, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([0.0, 0.0, 10.0, 10.0]).expand(1, 2, 4, 4, 4)
    targets = [{"boxes": torch.tensor([[31.0, 31.0, 49.0, 49.0]]), "labels": torch.tensor([2])}]  # cell (1, 1)
    logits = outputs[0, 1, 1, 1, 5:]  # the 20-px anchor (ratio 1: the best-shaped anchor only)
    kwargs = {"cls_weight": 0.5, "level_weights": [1.0], "ratio_thresh": 1.0}
    softmax = YOLOLoss(3, class_softmax=True, **kwargs)([outputs], [boxes], targets, ANCHORS[:1], [32])
    expected = 0.5 * torch.nn.functional.cross_entropy(logits[None], torch.tensor([2]))
    torch.testing.assert_close(softmax["loss_cls"], expected)
    sigmoid = YOLOLoss(3, **kwargs)([outputs], [boxes], targets, ANCHORS[:1], [32])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(sigmoid["loss_cls"], 0.5 * bce)
    torch.testing.assert_close(softmax["loss_obj"], sigmoid["loss_obj"])  # objectness stays BCE
