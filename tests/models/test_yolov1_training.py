"""YOLOv1 from random init: the FC head starts at a sane prior and survives AdamW at detkit's learning rate, and
GT-encoded outputs decode back to the GT through the letterbox (issue 7: yolov1_cpu ended at mAP@0.5 0.000)."""

import pytest
import torch

from detkit.boxes import box_iou
from detkit.data.transforms import letterbox_geometry, unletterbox
from detkit.models.detectors.yolov1 import YOLOv1

MAIN_LR = 6e-3  # configs/optim/adamw.yaml


def small(fc_norm: bool = True, num_classes: int = 3) -> YOLOv1:
    torch.manual_seed(0)
    return YOLOv1(num_classes, grid=4, input_size=128, width=8, repeats=(0, 0), fc_hidden=64, dropout=0.0,
                  fc_norm=fc_norm)


@pytest.mark.parametrize("head", ["fc", "conv"])
def test_a_fresh_head_predicts_the_prior_whatever_the_image(head):
    if head == "fc":
        model = small(num_classes=4)
    else:  # the conv head's grid is the trunk's 128 / 64 px output unless named
        torch.manual_seed(0)
        model = YOLOv1(4, grid=None, input_size=256, width=8, repeats=(0, 0), head="conv", local_filters=16)
        assert model.grid == 4
    out = model.raw_outputs(torch.rand(2, 3, model.input_size, model.input_size))
    boxes = out[..., :10].reshape(2, 4, 4, 2, 5)
    assert torch.allclose(boxes[..., :2], torch.tensor(0.5), atol=0.1)  # centred in the cell
    roots = boxes[..., 2:4]
    assert (roots > 0.05).all() and (roots < 0.6).all()  # a real box: √w, √h > 0 (a negative √ decodes to 0)
    assert (roots[..., 1, :] - roots[..., 0, :] > 0.1).all()  # the two predictors start at different sizes
    assert boxes[..., 4].abs().max() < 0.1  # confidence ~ 0: no object
    assert torch.allclose(out[..., 10:], torch.tensor(0.25), atol=0.1)  # class values ~ 1 / C


def hidden_positive_fraction(model: YOLOv1, images: torch.Tensor, targets: list[dict], steps: int) -> torch.Tensor:
    """Per image, the fraction of the first FC's units (after its norm) that are positive after ``steps``
    AdamW steps at the main recipe's learning rate."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=MAIN_LR)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a shared CPU more threads only wait for each other
    try:
        for _ in range(steps):
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        hidden = model.head[:3](model.backbone(images))  # flatten, FC, norm
    return (hidden > 0).float().mean(dim=1)


def test_the_hidden_layer_stays_alive_under_adamw_at_the_main_lr(toy_batch):
    # Unnormalized, each step moves the FC's pre-activations by ~ lr × fan-in: after a few steps nearly all of
    # them sit on the same side of 0 for every image and the head answers the same whatever the input.
    positive = hidden_positive_fraction(small(), *toy_batch, steps=12)
    assert ((positive > 0.3) & (positive < 0.7)).all(), positive


def test_the_conv_head_needs_the_grid_to_be_the_trunk_output():
    with pytest.raises(ValueError, match="input_size / 64 must equal grid"):
        YOLOv1(3, grid=7, input_size=256, width=4, repeats=(0, 0), head="conv")


def test_gt_encoded_outputs_decode_back_to_the_gt_through_the_letterbox():
    model = YOLOv1(3, grid=7, input_size=448, width=4, repeats=(0, 0), fc_hidden=8).eval()
    orig_h, orig_w = 300, 500  # landscape: padded top and bottom
    gt = torch.tensor([[20.0, 30.0, 120.0, 200.0], [300.0, 100.0, 340.0, 130.0], [400.0, 200.0, 490.0, 290.0]])
    labels = torch.tensor([2, 0, 1])
    ratio, left, top = letterbox_geometry(orig_h, orig_w, 448)
    boxed = gt * ratio + torch.tensor([left, top, left, top])
    cells, encoded = model.loss.coder.encode(boxed, (448, 448))
    assert len(set(map(tuple, cells.tolist()))) == len(gt)  # one object per cell
    out = torch.zeros(1, 7, 7, 2 * 5 + 3)
    out[0, cells[:, 1], cells[:, 0], :4] = encoded
    out[0, cells[:, 1], cells[:, 0], 4] = 1.0
    out[0, cells[:, 1], cells[:, 0], 10 + labels] = 1.0
    dets = model.postprocess(out, (448, 448))[0]
    top3 = unletterbox(dets["boxes"][:3], ratio, (left, top), (orig_h, orig_w))
    assert torch.allclose(dets["scores"][:3], torch.ones(3))
    match = box_iou(top3, gt).max(dim=1)
    assert (match.values > 0.999).all()
    assert torch.equal(dets["labels"][:3], labels[match.indices])
