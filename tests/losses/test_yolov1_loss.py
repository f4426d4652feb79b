"""YOLOv1: the responsible predictor, its IoU confidence target, the weighted sum-squared terms, the cells
whose class values train (the centre's, or every covered one), and the class-specific confidence at inference."""

import pytest
import torch

from detkit.boxes import elementwise_iou
from detkit.losses.yolov1 import YOLOv1Loss, covered_cells, responsible_predictor
from detkit.models.detectors.yolov1 import YOLOv1

SIZE = (64, 64)  # 2×2 grid: 32 px cells
GT = torch.tensor([[4.0, 4.0, 28.0, 20.0]])  # centre (16, 12) in cell (0, 0); w 24, h 16
EXACT = [0.5, 0.375, (24 / 64) ** 0.5, (16 / 64) ** 0.5]  # cell-relative centre, √ of image-relative size


def test_responsible_predictor_is_the_highest_iou_box():
    pred = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [4.0, 4.0, 24.0, 20.0]]])
    index, iou = responsible_predictor(pred, GT)
    assert index.tolist() == [1]
    assert torch.allclose(iou, elementwise_iou(pred[0, 1:], GT))


def output_with(box0, conf0, box1, conf1):
    out = torch.zeros(1, 2, 2, 2 * 5 + 2)
    out[0, 0, 0, :5] = torch.tensor([*box0, conf0])
    out[0, 0, 0, 5:10] = torch.tensor([*box1, conf1])
    return out


@pytest.mark.parametrize("exact_box", [0, 1])
def test_only_the_responsible_predictor_regresses_and_its_confidence_targets_the_iou(exact_box):
    off = [0.2, 0.2, 0.3, 0.3]
    boxes = [EXACT, off] if exact_box == 0 else [off, EXACT]
    out = output_with(boxes[0], 0.7 if exact_box == 0 else 0.3, boxes[1], 0.3 if exact_box == 0 else 0.7)
    losses = YOLOv1Loss(2, grid=2)(out, [{"boxes": GT, "labels": torch.tensor([0])}], SIZE)
    assert losses["loss_box"].abs() < 1e-10  # the exact box was chosen: nothing to regress
    assert torch.allclose(losses["loss_obj"], torch.tensor((0.7 - 1.0) ** 2))  # IoU of the exact box is 1
    assert torch.allclose(losses["loss_noobj"], torch.tensor(0.5 * 0.3**2))  # λ_noobj on the other one
    assert torch.allclose(losses["loss_cls"], torch.tensor(1.0))  # (0 − 1)² for class 0, 0 for class 1


def test_confidence_target_is_the_iou_of_an_imperfect_box_and_coordinates_weigh_five():
    shifted = [EXACT[0] + 0.25, *EXACT[1:]]  # 8 px to the right
    loss = YOLOv1Loss(2, grid=2)
    out = output_with([0.9, 0.9, 0.1, 0.1], 0.0, shifted, 0.5)
    losses = loss(out, [{"boxes": GT, "labels": torch.tensor([1])}], SIZE)
    pred = loss.decode_cells(out[0, 0, 0, :10].view(2, 5), torch.tensor([0, 0]), SIZE)[1]
    iou = elementwise_iou(pred[None], GT)
    assert torch.allclose(iou, torch.tensor([16 / 32]))
    assert torch.allclose(losses["loss_obj"], (0.5 - iou[0]) ** 2)
    assert torch.allclose(losses["loss_box"], torch.tensor(5.0 * 0.25**2))


def test_covered_cells_name_the_smallest_box_holding_each_cell_centre():
    # 4×4 grid on 128 px: cell centres at 16, 48, 80, 112.
    big, small = [0.0, 0.0, 100.0, 100.0], [40.0, 40.0, 60.0, 90.0]
    index = covered_cells(torch.tensor([big, small]), 4, (128, 128))
    expected = torch.full((4, 4), -1)
    expected[:3, :3] = 0  # centres 16, 48, 80 lie inside the big box, 112 does not
    expected[1:3, 1] = 1  # x 48 and y 48, 80 lie inside the small one too: the smaller box wins
    assert torch.equal(index, expected)
    assert (covered_cells(torch.zeros(0, 4), 4, (128, 128)) == -1).all()


def test_covered_class_cells_train_every_covered_cell_and_centres_keep_their_own_object():
    big, small = [0.0, 0.0, 100.0, 100.0], [40.0, 40.0, 60.0, 90.0]
    # The big box's centre (50, 50) falls in cell (1, 1), which the small box also covers: the centre wins there.
    targets = [{"boxes": torch.tensor([big, small]), "labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = torch.zeros(2, 4, 4, 2 * 5 + 2, requires_grad=True)
    losses = YOLOv1Loss(2, grid=4, class_cells="covered")(out, targets, (128, 128))
    assert torch.allclose(losses["loss_cls"], torch.tensor(9 / 2))  # 9 covered cells, (0 − 1)² each, batch of 2
    losses["loss_cls"].backward()
    pulled = -out.grad[..., 10:]  # towards the one-hot target: positive on the trained class
    assert (pulled[0, :3, :3].sum(-1) > 0).all() and pulled[0, 3].abs().sum() == 0 and pulled[1].abs().sum() == 0
    assert pulled[0, 1, 1, 0] > 0 and pulled[0, 2, 1, 1] > 0  # the big box's centre cell; a small-box cell
    centre_only = YOLOv1Loss(2, grid=4)(out.detach(), targets, (128, 128))["loss_cls"]
    assert torch.allclose(centre_only, torch.tensor(2 / 2))  # the paper's rule: the two centre cells only


def test_class_specific_confidence_at_inference():
    model = YOLOv1(2, grid=2, input_size=64, width=4, repeats=(0, 0), fc_hidden=8).eval()
    out = output_with(EXACT, 0.8, [0.5, 0.5, 0.1, 0.1], 0.0)
    out[0, 0, 0, 10:] = torch.tensor([0.25, 0.75])
    dets = model.postprocess(out, SIZE)[0]
    assert torch.allclose(dets["scores"][:2], torch.tensor([0.8 * 0.75, 0.8 * 0.25]))
    assert dets["labels"][:2].tolist() == [1, 0]
    assert torch.allclose(dets["boxes"][0], GT[0], atol=1e-4)


def test_yolov1_rejects_an_input_size_its_head_was_not_built_for():
    with pytest.raises(ValueError, match="multiple of 64"):
        YOLOv1(2, input_size=100)


def test_softmax_classes_train_by_cross_entropy_and_score_by_their_softmax():
    out = output_with(EXACT, 0.8, [0.5, 0.5, 0.1, 0.1], 0.0)
    out[0, 0, 0, 10:] = torch.tensor([2.0, 0.0])  # logits
    target = [{"boxes": GT, "labels": torch.tensor([1])}]
    losses = YOLOv1Loss(2, grid=2, class_softmax=True)(out, target, SIZE)
    assert torch.allclose(losses["loss_cls"], -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[1])
    model = YOLOv1(2, grid=2, input_size=64, width=4, repeats=(0, 0), fc_hidden=8, class_softmax=True).eval()
    dets = model.postprocess(out, SIZE)[0]
    assert torch.allclose(dets["scores"][:2], 0.8 * torch.softmax(torch.tensor([2.0, 0.0]), 0))
    assert dets["labels"][:2].tolist() == [0, 1]
