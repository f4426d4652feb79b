"""G-CNN: step targets, the grid at the paper's setting and the CPU config's tall one, the IoU-0.2 assignment,
one backbone pass for S head passes, the one-step switch, and the tiny config overfitting a 2-image batch."""

import pytest
import torch
from hydra.errors import InstantiationException

from detkit.anchors import gcnn_grid_count
from detkit.models.detectors.gcnn import assign_grid, step_target
from tests.models.overfit import assert_finds_the_boxes, overfit
from tests.models.roi_common import SMALL_VGG, build, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[30.0, 20.0, 60.0, 44.0]]), "labels": torch.tensor([0])}]


def test_step_targets_reach_the_ground_truth_exactly_at_the_last_step():
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [50.0, 40.0, 90.0, 100.0]])
    gt = torch.tensor([[10.0, 5.0, 40.0, 50.0], [47.0, 44.0, 80.0, 120.0]])
    assert torch.equal(step_target(boxes, gt, 3, 3), gt)
    assert torch.allclose(step_target(boxes, gt, 1, 3), boxes + (gt - boxes) / 3)
    # Moving exactly to each step's target walks the whole way in S_train steps, equal thirds.
    b = boxes
    for s in (1, 2, 3):
        b = step_target(b, gt, s, 3)
        assert torch.allclose(b, boxes + (gt - boxes) * s / 3, atol=1e-5)
    with pytest.raises(ValueError, match="step must be in 1..3"):
        step_target(boxes, gt, 4, 3)


def test_grid_at_the_paper_setting_and_steps_from_config():
    model = build("gcnn", *SMALL_VGG)
    grid = model.grid((480, 640))
    assert len(grid) == gcnn_grid_count() == 165
    assert (grid[:, 2] <= 640).all() and (grid[:, 3] <= 480).all() and (grid[0] == torch.tensor([0, 0, 640, 480])).all()
    assert (model.train_steps, model.test_steps) == (3, 5)
    assert model.head.pooler.kind == "roi_pool" and model.head.pooler.spatial_scale == 1 / 16


def test_cpu_grid_is_of_tall_boxes_and_a_bad_ratio_fails_at_build():
    model = build("gcnn_cpu")
    grid = model.grid((384, 384))
    assert len(grid) == gcnn_grid_count(model.grid_scales, model.grid_overlap, model.grid_ratios) > 1000
    wh = grid[:, 2:] - grid[:, :2]
    assert torch.allclose(wh[:, 1] / wh[:, 0], torch.tensor(2.0), rtol=1e-4)  # the digits' h / w
    assert model.test_steps == model.train_steps == 3
    with pytest.raises(InstantiationException, match="ratios must be > 0 and finite, got -1"):
        build("gcnn_cpu", "model.grid_ratios=[-1.0]")
    squares = build("gcnn_cpu", "model.grid_ratios=null")  # null: the paper's squares
    assert squares.grid_ratios == (1.0,)
    wh = squares.grid((384, 384))[:, 2:] - squares.grid((384, 384))[:, :2]
    assert torch.allclose(wh[:, 0], wh[:, 1])


def test_assignment_needs_iou_above_0_2_and_takes_the_best_ground_truth():
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0], [60.0, 0.0, 160.0, 100.0]])
    # IoU with GT 0 (shift d: (100 − d) / (100 + d)): 0.82 (0.33 with GT 1) / 0.212 / 0.190; box 3 overlaps
    # GT 1 (0.82) more than GT 0 (0.33).
    grid = torch.tensor([[10.0, 0.0, 110.0, 100.0], [-65.0, 0.0, 35.0, 100.0], [-68.0, 0.0, 32.0, 100.0],
                         [50.0, 0.0, 150.0, 100.0]])
    labels, matched = assign_grid(grid, gt, torch.tensor([4, 7]), num_classes=9)
    assert labels.tolist() == [4, 4, 9, 7]
    assert torch.equal(matched[1], gt[0]) and torch.equal(matched[3], gt[1]) and torch.equal(matched[2], grid[2])
    labels, _ = assign_grid(grid, gt[:0], torch.tensor([], dtype=torch.long), num_classes=9)
    assert (labels == 9).all()


def _count_calls(model):
    calls = {"backbone": 0, "head": 0, "rois": []}

    def on_backbone(*_):
        calls["backbone"] += 1

    def on_head(_, args, __):
        calls["head"] += 1
        calls["rois"].append(torch.cat(args[1]))

    model.backbone.register_forward_hook(on_backbone)
    model.head.register_forward_hook(on_head)
    return calls


@pytest.mark.parametrize("steps", [(3, 5), (1, 1)])
def test_backbone_once_per_batch_head_once_per_step(steps):
    train_steps, test_steps = steps
    model = build("gcnn", *SMALL_VGG, f"model.train_steps={train_steps}", f"model.test_steps={test_steps}")
    calls = _count_calls(model)
    images = torch.rand(2, 3, 64, 64)
    losses = model(images, TARGETS)
    assert calls["backbone"] == 1 and calls["head"] == train_steps
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    grid = model.grid((64, 64)).repeat(2, 1)
    assert torch.equal(calls["rois"][0], grid)  # B_1 is the grid
    for rois in calls["rois"][1:]:  # B_{s+1}: the network's own (detached) prediction
        assert not rois.requires_grad and not torch.allclose(rois, grid)
    model.eval()
    calls.update(backbone=0, head=0)
    dets = model(images)
    assert calls["backbone"] == 1 and calls["head"] == test_steps
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}


def test_tiny_config_overfits_two_images(toy_batch, precise_batchnorm):
    # The config as it is: its grid of tall boxes, 64 drawn per image, 5x5 pooling.
    model = build("gcnn_cpu")
    overfit(model, *toy_batch, steps=50, lr=0.003, shrink=0.3)
    precise_batchnorm(model, *toy_batch)
    assert_finds_the_boxes(model, *toy_batch)


def test_test_keep_steps_on_only_the_most_object_like_boxes_of_each_image():
    model = build("gcnn", *SMALL_VGG, "model.test_steps=3").eval()
    images = torch.rand(2, 3, 64, 64)
    full = model(images)
    count = len(model.grid((64, 64)))
    model.test_keep = count  # keeping every box changes nothing
    same = model(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full, same) for k in a)
    keep = count // 3
    model.test_keep = keep
    outputs = []
    model.head.register_forward_hook(lambda _, args, out: outputs.append((torch.cat(args[1]), *out)))
    model(images)
    assert [len(rois) for rois, *_ in outputs] == [2 * count, 2 * keep, 2 * keep]
    rois, logits, deltas = outputs[0]
    objectness = logits.softmax(dim=1)[:, : model.num_classes].amax(dim=1).view(2, count)
    moved = model.step(logits, deltas, rois, (64, 64))
    for i in range(2):  # step 2 sees, of each image, the first step's output for its `keep` best boxes
        best = objectness[i].topk(keep).indices
        assert torch.equal(outputs[1][0][i * keep:(i + 1) * keep], moved.view(2, count, 4)[i, best])


@pytest.mark.parametrize("assign", ["initial", "per_step"])
def test_per_step_assignment_labels_each_steps_boxes_by_their_own_iou(monkeypatch, assign):
    import detkit.models.detectors.gcnn as gcnn

    model = build("gcnn", *SMALL_VGG, f"model.assign={assign}")
    with torch.no_grad():  # every box moves right by half its width a step (deltas are scaled by 10)
        model.head.bbox_pred.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]).repeat(3))
    calls, seen = _count_calls(model), []
    loss = gcnn.roi_head_loss
    monkeypatch.setattr(gcnn, "roi_head_loss", lambda logits, deltas, labels, regression: (
        seen.append((labels.clone(), regression.clone())), loss(logits, deltas, labels, regression))[1])
    model(torch.rand(2, 3, 64, 64), TARGETS)
    count = len(model.grid((64, 64)))
    for step, (rois, (labels, regression)) in enumerate(zip(calls["rois"], seen)):
        per_image = [assign_grid(r, t["boxes"], t["labels"], 3) for r, t in zip(rois.split(count), TARGETS)]
        own, matched = torch.cat([p[0] for p in per_image]), torch.cat([p[1] for p in per_image])
        if step == 0 or assign == "per_step":
            assert torch.equal(labels, own)  # what the boxes of this step cover
            fg = own < 3
            target = model.coder.encode(step_target(rois[fg], matched[fg], step + 1, model.train_steps), rois[fg])
            assert torch.allclose(regression[fg], target, atol=1e-5)
        else:
            assert torch.equal(labels, seen[0][0])  # the paper's: the grid box's ground truth at every step
    assert not torch.equal(calls["rois"][0], calls["rois"][-1])
    # the boxes moved: some cover another object, or none, than their grid box did
    assert any(not torch.equal(labels, seen[0][0]) for labels, _ in seen[1:]) == (assign == "per_step")
    with pytest.raises(InstantiationException, match="assign must be one of"):
        build("gcnn", *SMALL_VGG, "model.assign=sometimes")
