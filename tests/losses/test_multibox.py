import pytest
import torch
import torch.nn.functional as F

from detkit.losses.multibox import match_priors, multibox_loss, ssd_coder

# Ten 10x10 priors side by side along x.
PRIORS = torch.tensor([[10.0 * i, 0.0, 10.0 * i + 10, 10.0] for i in range(10)])


def test_match_priors_threshold_and_best_prior():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [36.0, 0.0, 58.0, 10.0]])  # second: best IoU 10/22 < 0.5
    classes, matched = match_priors(PRIORS, boxes, torch.tensor([4, 1]), iou_threshold=0.5)
    assert classes[0] == 5 and classes[3:6].tolist() == [0, 2, 0]
    assert (classes > 0).sum() == 2 and torch.equal(matched[0], boxes[0])
    empty, same = match_priors(PRIORS, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (empty == 0).all() and torch.equal(same, PRIORS)


def test_ssd_coder_uses_variances():
    coder = ssd_coder((0.1, 0.2))
    box = torch.tensor([[2.0, 0.0, 12.0, 20.0]])
    deltas = coder.encode(box, PRIORS[:1])
    assert torch.allclose(deltas, torch.tensor([[0.2 / 0.1, 0.5 / 0.1, 0.0, torch.log(torch.tensor(2.0)) / 0.2]]))
    assert torch.allclose(coder.decode(deltas, PRIORS[:1]), box)


def _loss_inputs(num_objects: int):
    torch.manual_seed(0)
    logits = torch.randn(1, len(PRIORS), 3)
    boxes = PRIORS[[1, 6][:num_objects]]
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1][:num_objects])}]
    return logits, torch.zeros(1, len(PRIORS), 4), targets


@pytest.mark.parametrize("num_objects, expected_negatives", [(1, 3), (2, 6)])
def test_hard_negative_mining_keeps_three_negatives_per_positive(num_objects, expected_negatives):
    logits, deltas, targets = _loss_inputs(num_objects)
    losses = multibox_loss(logits, deltas, PRIORS, targets)
    classes = torch.zeros(len(PRIORS), dtype=torch.long)
    positive = torch.zeros(len(PRIORS), dtype=torch.bool)
    for box, label in zip(targets[0]["boxes"], targets[0]["labels"]):
        i = int((PRIORS == box).all(dim=1).nonzero())
        classes[i], positive[i] = label + 1, True
    ce = F.cross_entropy(logits[0], classes, reduction="none")
    hardest = ce[~positive].sort(descending=True).values[:expected_negatives]
    expected = (ce[positive].sum() + hardest.sum()) / num_objects
    assert losses["loss_cls"] == pytest.approx(expected.item(), rel=1e-5)
    # Priors exactly on the objects: zero offsets are the targets, so the box loss is 0.
    assert losses["loss_box"] == 0


def test_all_negatives_when_fewer_than_three_per_positive():
    priors = PRIORS[:4]
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 3)
    targets = [{"boxes": priors[[0, 2]], "labels": torch.tensor([0, 1])}]  # 2 positives, 2 negatives < 6
    losses = multibox_loss(logits, torch.zeros(1, 4, 4), priors, targets)
    ce = F.cross_entropy(logits[0], torch.tensor([1, 0, 2, 0]), reduction="sum")
    assert losses["loss_cls"] == pytest.approx(ce.item() / 2, rel=1e-5)


def test_no_objects_gives_zero_finite_losses_with_gradient():
    logits = torch.randn(2, len(PRIORS), 3, requires_grad=True)
    deltas = torch.randn(2, len(PRIORS), 4, requires_grad=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = multibox_loss(logits, deltas, PRIORS, empty)
    assert losses["loss_box"] == 0 and losses["loss_cls"] == 0
    sum(losses.values()).backward()
    assert logits.grad is not None


def test_box_loss_is_smooth_l1_of_positives_over_positives():
    logits, deltas, targets = _loss_inputs(2)
    deltas[0, 1] = torch.tensor([0.5, 0.0, 2.0, 0.0])  # smooth-L1: 0.125 + 1.5
    assert multibox_loss(logits, deltas, PRIORS, targets)["loss_box"] == pytest.approx(1.625 / 2)
