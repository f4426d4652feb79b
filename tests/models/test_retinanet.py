import math

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from detkit.models.backbones.resnet import ResNet
from detkit.models.detectors.common import batch_images
from detkit.models.detectors.retinanet import RetinaNet, RetinaNetHead
from tests.conftest import compose_config
from tests.models.overfit import assert_finds_the_boxes, overfit


def tiny(num_classes: int = 3, *overrides: str) -> RetinaNet:
    cfg = compose_config("train", ["model=retinanet_cpu", *overrides])
    return instantiate(cfg.model, num_classes=num_classes)


def raw(model: RetinaNet, images: torch.Tensor):
    with torch.no_grad():
        return model.raw_outputs(batch_images(images, model.image_mean, model.image_std, 32))


def test_prior_probability_init():
    torch.manual_seed(0)
    for norm in ("none", "gn"):
        model = tiny(5, f"model.head_norm={norm}").eval()
        logits, _, _ = raw(model, torch.rand(1, 3, 128, 128))
        assert logits.shape[-1] == 5
        assert logits.sigmoid().mean().item() == pytest.approx(0.01, rel=0.05)
    head = RetinaNetHead(16, 9, 2, prior=0.2)
    assert torch.allclose(head.cls_logits.bias.sigmoid(), torch.full((18,), 0.2))


def test_9_anchors_per_location_on_p3_to_p7():
    model = tiny()
    assert model.num_anchors == 9 and model.neck.strides == [8, 16, 32, 64, 128]
    _, deltas, anchors = raw(model.eval(), torch.rand(1, 3, 128, 128))
    assert [len(a) for a in anchors] == [s * s * 9 for s in (16, 8, 4, 2, 1)]
    assert deltas.shape == (1, sum(len(a) for a in anchors), 4)
    wh = anchors[1][:9, 2:] - anchors[1][:9, :2]  # the 9 anchors of P4's first cell (base size 32 in tiny)
    sides = wh.prod(1).sqrt().view(3, 3)  # scale-major, then ratio
    assert torch.allclose(sides, torch.tensor([32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)])[:, None].expand(3, 3),
                          rtol=1e-4)
    assert torch.allclose((wh[:, 1] / wh[:, 0]).view(3, 3), torch.tensor([0.5, 1.0, 2.0]).expand(3, 3), rtol=1e-4)


def test_same_size_as_torchvision_retinanet_with_p6_from_p5():
    ours = RetinaNet(20, ResNet(50), p6_from="p5")
    theirs = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=20)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert count(ours.head) == count(theirs.head)  # 4 convs of 256 per subnet, 3x3 predictors


def test_full_config_trains_and_predicts_at_a_small_input():
    torch.manual_seed(0)
    cfg = compose_config("train", ["model=retinanet"])
    model = instantiate(cfg.model, num_classes=4)
    assert model.neck.fpn.extra_blocks.p6.in_channels == 2048  # P6 from C5, as in the paper
    assert len(model.head.cls_subnet) == 8 and model.head.cls_logits.out_channels == 9 * 4
    images = torch.rand(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([3])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box"}
    sum(losses.values()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 1


def test_loss_is_normalised_by_positives_and_ignores_the_middle_band():
    torch.manual_seed(0)
    model = tiny(2)
    images = torch.rand(1, 3, 64, 64)
    anchors = torch.cat(raw(model.eval(), images)[2])
    box = anchors[100:101]  # a ground truth exactly on one anchor
    n = len(anchors)
    logits = torch.zeros(1, n, 2)
    deltas = torch.zeros(1, n, 4)
    losses = model.loss(logits, deltas, anchors, [{"boxes": box, "labels": torch.tensor([1])}])
    iou = torchvision.ops.box_iou(box, anchors)[0]
    positives = int((iou >= 0.5).sum())
    negatives = int((iou < 0.4).sum())
    # At logit 0 every (anchor, class) costs α or 1 − α times 0.5² · ln 2.
    per_pair = 0.25 * math.log(2)
    expected = (positives * (0.25 + 0.75) + negatives * 2 * 0.75) * per_pair / positives
    assert positives >= 1 and negatives + positives < n  # some anchors fall in the ignored band
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-4)


def test_inference_keeps_per_level_top_k_above_the_threshold():
    torch.manual_seed(0)
    model = tiny(3, "model.topk_per_level=2", "model.score_thresh=0.0", "model.nms_thresh=1.0").eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128))
    for det in out:
        assert len(det["scores"]) == 2 * 5  # two pairs per level survive, NMS at IoU 1 removes none
        assert (det["boxes"][:, 2:] <= 128).all() and (det["boxes"] >= 0).all()
    model.score_thresh = 0.05
    with torch.no_grad():
        assert all(len(det["scores"]) == 0 for det in model(torch.rand(1, 3, 128, 128)))  # all near π = 0.01


def test_tiny_config_overfits_a_tiny_batch(toy_batch, precise_batchnorm):
    torch.manual_seed(0)
    model = tiny()
    images, targets = toy_batch
    overfit(model, images, targets, steps=20, lr=3e-3, shrink=0.5)
    precise_batchnorm(model, images, targets)
    assert_finds_the_boxes(model, images, targets)
