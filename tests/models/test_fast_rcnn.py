"""Fast R-CNN: configs build, dense and external proposals (given in eval mode, from the targets in training,
from a proposals file through the dataset and the evaluator), roi_pool vs roi_align, and the tiny config
overfitting a 2-image batch."""

import pytest
import torch

from detkit.app.build import build_dataset, build_model
from detkit.data.loader import build_loader
from detkit.data.proposals import save_proposals
from detkit.evaluation.coco import predict
from detkit.models.detectors.fast_rcnn import DenseProposals
from tests.conftest import compose_config
from tests.data.conftest import write_coco
from tests.models.overfit import assert_finds_the_boxes, overfit
from tests.models.roi_common import SMALL_VGG, build, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_configs_build_with_the_papers_settings():
    cfg = compose_config("train", ["model=fast_rcnn"]).model
    assert (cfg.representation, cfg.dropout, cfg.pooler, cfg.fg_iou, list(cfg.bg_iou)) == (4096, 0.5, "roi_pool",
                                                                                         0.5, [0.1, 0.5])
    model = build("fast_rcnn", *SMALL_VGG, num_classes=20)
    assert model.head.cls_score.out_features == 21 and model.head.bbox_pred.out_features == 80
    assert model.head.pooler.spatial_scale == 1 / 16 and model.backbone.strides == [16]
    assert len(model.dense((384, 384))) == 1728
    tiny = build("fast_rcnn_cpu")
    assert len(tiny.dense((384, 384))) == 48 * 48 + 24 * 24 + 12 * 12 and tiny.head.pooler.spatial_scale == 1 / 8


@pytest.mark.parametrize("name", ["fast_rcnn_cpu", "gcnn_cpu"])
def test_cpu_configs_pool_the_finest_fpn_level_which_carries_the_coarse_map(name):
    model = build(name)
    assert model.backbone.strides == [8, 16] and model.head.pooler.spatial_scale == 1 / 8
    images = torch.rand(2, 3, 64, 64)
    pooled = model.features(images)
    assert pooled.shape == (2, 64, 8, 8)
    # the stride-16 map reaches the pooled map through the top-down path: zeroing its lateral changes it
    with torch.no_grad():
        model.neck.fpn.inner_blocks[1][0].weight.zero_()
        model.neck.fpn.inner_blocks[1][0].bias.zero_()
    assert not torch.allclose(model.features(images), pooled)
    # the coarse level's 3x3 smoothing is not built: its output is never pooled
    assert all(isinstance(b, torch.nn.Identity) for b in model.neck.fpn.layer_blocks[1:])
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 30.0, 50.0]]), "labels": torch.tensor([1])}] * 2
    model.train()
    sum(model(images, targets).values()).backward()
    assert model.neck.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0
    assert model.neck.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0  # the stride-8 map's lateral


@pytest.mark.parametrize("kind", ["roi_pool", "roi_align"])
def test_pooler_option_trains_and_detects(kind):
    model = build("fast_rcnn", *SMALL_VGG, f"model.pooler={kind}")
    assert model.head.pooler.kind == kind
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = model(torch.rand(1, 3, 64, 64), targets)
    sum(losses.values()).backward()
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    assert model.head.fc6.weight.grad.abs().sum() > 0
    model.eval()
    dets = model(torch.rand(2, 3, 64, 64))
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}
    # Inference in chunks of at most max_rois RoIs (whole images) gives what one call gives.
    features = torch.rand(3, model.backbone.out_channels[-1], 4, 4)
    rois = [torch.rand(n, 4) * 20 + torch.tensor([0, 0, 30, 30]) for n in (4, 3, 5)]
    chunked = model.head_in_chunks(features, rois, [(64, 64)] * 3, max_rois=6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunked, model.head(features, rois, [(64, 64)] * 3)))
    with pytest.raises(ValueError, match="one number or one per size"):
        DenseProposals(stride=[8, 16], sizes=[16, 32, 64])


def test_eval_mode_takes_proposals_without_targets():
    model = build("fast_rcnn", *SMALL_VGG).eval()
    seen = []
    model.head.register_forward_hook(lambda _, args, __: seen.append(args[1]))
    given = [torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 64.0]])]
    dets = model(torch.rand(2, 3, 64, 64), proposals=given)
    assert len(dets) == 2 and all(torch.equal(a, b) for a, b in zip(seen[0], given))
    # Eval mode never reads targets: their proposals are not used, the dense ones are.
    seen.clear()
    model(torch.rand(1, 3, 64, 64), [{"proposals": given[0]}])
    assert torch.equal(seen[0][0], model.dense((64, 64)))
    with pytest.raises(ValueError, match="proposals for 1 images but 2 images"):
        model(torch.rand(2, 3, 64, 64), proposals=given[:1])


def test_training_takes_the_targets_proposals():
    model = build("fast_rcnn", *SMALL_VGG)
    x = torch.rand(2, 3, 64, 64)
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0]]), torch.tensor([[5.0, 5.0, 20.0, 20.0], [0, 0, 64, 64]])]
    targets = [{"boxes": b[:1], "labels": torch.tensor([0]), "proposals": b} for b in boxes]
    assert all(torch.equal(a, b) for a, b in zip(model.region_proposals(x, targets), boxes))
    losses = model(x, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="1 of 2 targets carry 'proposals'"):
        model(x, [targets[0], {"boxes": boxes[0], "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="targets are required in training mode"):
        model(x)
    with pytest.raises(Exception, match="set data.proposals_file=p.json"):  # Hydra's error around the ValueError
        build("fast_rcnn", *SMALL_VGG, "+model.proposals_file=p.json")


def test_a_proposals_file_reaches_the_model_through_the_dataset(tmp_path):
    ann_file, image_dir = write_coco(tmp_path)  # images 0, 1, 2 of 40×30, 50×20, 32×32
    path = tmp_path / "proposals.json"
    original = {0: torch.tensor([[1.0, 2.0, 11.0, 7.0]]), 1: torch.tensor([[10.0, 4.0, 40.0, 16.0], [0, 0, 50, 20]]),
                2: torch.tensor([[3.0, 3.0, 20.0, 30.0]])}
    save_proposals(path, original)
    data = compose_config("train", [
        "data.img_size=64", "data.test_size=64", f"data.proposals_file={path}",
        *(f"data.{split}.{key}={value}" for split in ("train", "val")
          for key, value in (("ann_file", ann_file), ("image_dir", image_dir)))]).data
    dataset = build_dataset(data, "val", train=False)
    model = build("fast_rcnn", *SMALL_VGG)
    seen = []
    model.head.register_forward_hook(lambda _, args, __: seen.extend(args[1]))
    predictions = predict(model, build_loader(dataset, 2, train=False))
    assert [p["image_id"] for p in predictions] == [0, 1, 2] and len(seen) == 3
    for image_id, boxes in enumerate(seen):  # the letterbox of the boxes: × ratio, + pad
        target = dataset[image_id][1]
        left, top = target["pad"]
        assert torch.allclose(boxes, original[image_id] * target["ratio"] + torch.tensor([left, top, left, top]))
    assert data.mosaic.prob > 0
    with pytest.raises(ValueError, match="needs data.mosaic.prob=0"):
        build_dataset(data, "train")


def test_tiny_config_overfits_two_images(toy_batch, precise_batchnorm):
    # fast_rcnn_cpu's one proposal ratio (h/w 2) is the built-in digits' shape, refitted on other data
    # (auto.priors); the toy boxes are wide and tall
    model = build_model(compose_config("train", ["model=fast_rcnn_cpu", "model.proposals.ratios=[0.5,1,2]"]).model,
                        num_classes=3)
    overfit(model, *toy_batch, steps=80, lr=0.003, shrink=0.3)
    precise_batchnorm(model, *toy_batch)
    assert_finds_the_boxes(model, *toy_batch)
