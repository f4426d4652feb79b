"""YOLO9000's joint training in YOLOLoss: a classification image (``image_label``, no boxes) trains the class
outputs of its single best-scoring prediction (objectness × path product) with the WordTree loss and, if asked,
the objectness of its predictions as darknet's region layer does."""

import pytest
import torch

from detkit.losses.yolo import YOLOLoss
from detkit.wordtree import WordTree

PARENTS = [10, 11, 11, 11, 11, 11, 10, 11, 10, 10, -1, -1]
ANCHORS = torch.tensor([[[16.0, 16.0], [32.0, 32.0]], [[48.0, 48.0], [96.0, 96.0]]])
STRIDES = [8, 16]
GT = torch.tensor([[20.0, 36.0, 36.0, 52.0]])  # a 16-px box centred in cell (3, 5) of the stride-8 level


def two_levels(seed: int = 0):
    """Raw outputs (2, 2, H, W, 5 + 12) at 64 px (8×8 and 4×4 cells), leaf tensors that collect gradients, and
    decoded boxes."""
    g = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(2, 2, s, s, 17, generator=g) for s in (8, 4)]
    boxes = []
    for out in outputs:
        xy = torch.rand(*out.shape[:4], 2, generator=g) * 64
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(*out.shape[:4], 2, generator=g) * 20], dim=-1))
    return outputs, boxes


def loss_fn(**kwargs) -> YOLOLoss:
    return YOLOLoss(12, "giou", level_weights=[1.0, 1.0], ratio_thresh=1.5, wordtree=WordTree(PARENTS), **kwargs)


@pytest.mark.parametrize("objectness", [None, 0.3])
def test_a_classification_image_trains_only_its_best_prediction_for_its_label(objectness):
    outputs, boxes = two_levels()
    # make (level 1, anchor 1, y 2, x 0) of image 1 the one most sure of "9" (loops → 9), objectness σ(3)
    outputs[1][1, 1, 2, 0, 5 + 10], outputs[1][1, 1, 2, 0, 5 + 9], outputs[1][1, 1, 2, 0, 4] = 6.0, 6.0, 3.0
    outputs = [o.requires_grad_() for o in outputs]
    targets = [{"boxes": GT, "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_label": 9}]
    losses = loss_fn(class_only_objectness=objectness)(outputs, boxes, targets, ANCHORS, STRIDES)
    sum(losses.values()).backward()
    grad = [o.grad[1] for o in outputs]  # the classification image's gradients
    touched = [(lvl, *idx) for lvl, g in enumerate(grad) for idx in g[..., 5:].abs().sum(-1).nonzero().tolist()]
    assert touched == [(1, 1, 2, 0)]  # class outputs: the chosen prediction only
    assert all(g[..., :4].abs().sum() == 0 for g in grad)  # no box outputs
    best = grad[1][1, 2, 0]
    assert best[4] == 0  # objectness 0.95 is above 0.3: darknet's hinge leaves it
    others = torch.cat([g[..., 4].flatten() for g in grad])
    if objectness is None:
        assert others.abs().sum() == 0
    else:  # every other prediction of the image is pushed towards objectness 0
        assert (others > 0).sum() == others.numel() - 1
    assert best[5:].abs().sum() > 0
    assert best[5 + torch.tensor([1, 2, 3, 4, 5, 7])].abs().sum() == 0  # sets off the path of "9" stay untouched


def test_the_choice_weighs_objectness_and_a_low_objectness_is_raised_to_the_assumed_iou():
    """darknet's region layer: the prediction with the highest objectness × path product is chosen, and its
    objectness is raised towards 0.3 while below it."""
    outputs, boxes = two_levels()
    for o in outputs:
        o[1, ..., 5 + 10], o[1, ..., 5 + 9] = -6.0, -6.0  # nothing sure of "9" ...
    outputs[0][1, 0, 1, 1, 5 + 10], outputs[0][1, 0, 1, 1, 5 + 9], outputs[0][1, 0, 1, 1, 4] = 6.0, 6.0, -8.0
    outputs[1][1, 1, 3, 3, 5 + 10], outputs[1][1, 1, 3, 3, 5 + 9], outputs[1][1, 1, 3, 3, 4] = 5.0, 5.0, -1.5
    outputs = [o.requires_grad_() for o in outputs]  # ... but two: the surer one has objectness σ(-8)
    targets = [{"boxes": GT, "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_label": 9}]
    sum(loss_fn(class_only_objectness=0.3)(outputs, boxes, targets, ANCHORS, STRIDES).values()).backward()
    assert outputs[0].grad[1, 0, 1, 1, 5:].abs().sum() == 0
    assert outputs[1].grad[1, 1, 3, 3, 5:].abs().sum() > 0  # σ(-1.5) × p beats σ(-8) × p'
    assert outputs[1].grad[1, 1, 3, 3, 4] < 0  # σ(-1.5) = 0.18 < 0.3: raised


@pytest.mark.parametrize("objectness", [None, 0.3])
def test_the_detection_image_trains_as_without_the_classification_image(objectness):
    """Box and objectness gradients of a detection image are those of a batch without the classification image
    (its objectness term is not diluted by the classification image's predictions); the class term is shared."""
    outputs, boxes = two_levels(1)
    detection = {"boxes": GT, "labels": torch.tensor([3])}
    classification = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_label": 10}
    joint_out = [o.clone().requires_grad_() for o in outputs]
    alone_out = [o[:1].clone().requires_grad_() for o in outputs]
    joint = loss_fn(class_only_objectness=objectness)(joint_out, boxes, [detection, classification], ANCHORS,
                                                      STRIDES)
    alone = loss_fn(class_only_objectness=objectness)(alone_out, [b[:1] for b in boxes], [detection], ANCHORS,
                                                      STRIDES)
    torch.testing.assert_close(joint["loss_box"], alone["loss_box"])
    if objectness is None:  # the classification image's cells left out
        torch.testing.assert_close(joint["loss_obj"], alone["loss_obj"])
    else:  # its own mean added at its share of the batch (1/2)
        assert joint["loss_obj"] > alone["loss_obj"]
    (joint["loss_obj"] + joint["loss_box"]).backward()
    (alone["loss_obj"] + alone["loss_box"]).backward()
    for j, a in zip(joint_out, alone_out):
        torch.testing.assert_close(j.grad[:1, ..., :5], a.grad[..., :5])
    assert not torch.allclose(joint["loss_cls"], alone["loss_cls"])


def test_a_classification_image_with_boxes_or_a_bad_label_is_an_error():
    outputs, boxes = two_levels()
    both = [{"boxes": GT, "labels": torch.tensor([3]), "image_label": 3}, {"boxes": GT, "labels": torch.tensor([3])}]
    with pytest.raises(ValueError, match="must have no boxes"):
        loss_fn()(outputs, boxes, both, ANCHORS, STRIDES)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"image_label must be in 0..11"):
        loss_fn()(outputs, boxes, [empty, {**empty, "image_label": 12}], ANCHORS, STRIDES)


@pytest.mark.parametrize("neighbor_cells", [False, True])
def test_a_classification_image_weighs_as_one_detection_object(neighbor_cells):
    """darknet gives a box one responsible prediction; here a box has several positives (anchors, neighbour
    cells), so the classification image's one prediction is weighted by the positives per box: with equal
    logits and the same label its class gradient is that of all of one box's positives together."""
    outputs, boxes = two_levels(2)
    for out in outputs:
        out[..., 5:] = 0.0  # every prediction's class outputs equal: equal per-prediction gradients
    outputs = [o.requires_grad_() for o in outputs]
    targets = [{"boxes": GT, "labels": torch.tensor([9])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_label": 9}]
    loss = loss_fn(class_only_objectness=0.3, neighbor_cells=neighbor_cells)(outputs, boxes, targets, ANCHORS,
                                                                             STRIDES)
    (loss["loss_cls"] + sum(o.sum() * 0 for o in outputs)).backward()  # a level without a term: zero grads
    detection = torch.cat([o.grad[0, ..., 5:].reshape(-1, 12) for o in outputs])
    classification = torch.cat([o.grad[1, ..., 5:].reshape(-1, 12) for o in outputs])
    positives = detection.abs().sum(1) > 0
    chosen = classification.abs().sum(1) > 0
    assert int(chosen.sum()) == 1 and int(positives.sum()) == (3 if neighbor_cells else 1)
    torch.testing.assert_close(classification[chosen].sum(0), detection[positives].sum(0))
