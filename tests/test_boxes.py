import pytest
import torch
from torchvision.ops import box_iou, complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from detkit.boxes import CellCoder, DeltaCoder, YOLOCoder, clip_boxes, elementwise_iou, pairwise_iou, remove_small


def random_boxes(n: int, seed: int = 0, scale: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


TORCHVISION_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss,
                      "ciou": complete_box_iou_loss}


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_elementwise_matches_the_pairwise_diagonal(kind):
    a, b = random_boxes(50, 1), random_boxes(50, 2)
    diag = pairwise_iou(a, b, kind).diagonal()
    assert torch.allclose(elementwise_iou(a, b, kind), diag, atol=1e-6)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_one_minus_value_matches_torchvision_loss_values_and_gradients(kind):
    a = random_boxes(40, 3).requires_grad_(True)
    b = random_boxes(40, 4)
    ours = (1 - elementwise_iou(a, b, kind)).sum()
    (g_ours,) = torch.autograd.grad(ours, a)
    theirs = TORCHVISION_LOSSES[kind](a, b, reduction="sum")
    (g_theirs,) = torch.autograd.grad(theirs, a)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g_ours, g_theirs, atol=1e-6)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_degenerate_boxes_stay_finite(kind):
    a = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 4.0, 4.0], [0, 0, 1e6, 1e6],
                      [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 9.0, 5.0], [1.0, 1.0, 4.0, 4.0], [1.0, 1.0, 2e6, 2e6],
                      [1e5, 1e5, 1e5 + 1, 1e5 + 1]], dtype=torch.float64)
    values = elementwise_iou(a, b, kind)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(a.grad).all()
    assert values[2].item() == pytest.approx(1.0, abs=1e-6)  # identical boxes
    assert values[4] <= 0 and values[4] >= -1  # far apart: IoU 0, penalties bounded


def test_pairwise_iou_is_torchvision_box_iou_and_rejects_unknown_kind():
    a, b = random_boxes(7, 5), random_boxes(9, 6)
    assert torch.equal(pairwise_iou(a, b), box_iou(a, b))
    with pytest.raises(ValueError, match="unknown IoU kind"):
        pairwise_iou(a, b, "eiou")


def test_delta_coder_round_trip_and_clamp():
    boxes, anchors = random_boxes(100, 7), random_boxes(100, 8)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = DeltaCoder(weights)
        assert torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=1e-5)
    huge = DeltaCoder().decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    assert torch.isfinite(huge).all() and (huge[0, 2] - huge[0, 0]) == pytest.approx(1000.0, rel=1e-4)


def test_yolo_coder_round_trip():
    boxes = random_boxes(100, 9)
    stride = 16.0
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = (centres / stride).floor()
    anchors = torch.rand(100, 2, dtype=torch.float64) * 60 + 5
    coder = YOLOCoder()
    t = coder.encode(boxes, cells, anchors, stride)
    assert torch.allclose(coder.decode(t, cells, anchors, stride), boxes, atol=1e-5)


def test_cell_coder_round_trip_and_ranges():
    boxes = random_boxes(100, 10, scale=200.0).clamp(max=300)
    coder = CellCoder(grid=7)
    cells, targets = coder.encode(boxes, (300, 300))
    assert (cells >= 0).all() and (cells <= 6).all()
    assert (targets[:, :2] >= 0).all() and (targets[:, :2] < 1).all()
    assert torch.allclose(coder.decode(targets, cells, (300, 300)), boxes, atol=1e-5)


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -5.0, 20.0, 30.0], [10.0, 10.0, 11.0, 40.0], [0.0, 0.0, 200.0, 200.0]])
    assert clip_boxes(boxes, (25, 100)).tolist() == [[0, 0, 20, 25], [10, 10, 11, 25], [0, 0, 100, 25]]
    assert remove_small(boxes, 2.0).tolist() == [0, 2]
