"""Fast R-CNN: configs build, dense and external proposals (json round trip and clear errors), roi_pool vs
roi_align, and the tiny config overfitting a 2-image batch."""

import json

import pytest
import torch
from hydra.utils import instantiate

from detkit.data.proposals import ProposalFileError, load_proposals, proposals_for, save_proposals
from detkit.models.detectors.fast_rcnn import DenseProposals
from tests.conftest import compose_config
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
    tiny = build("fast_rcnn_tiny")
    assert len(tiny.dense((384, 384))) == 2688 and tiny.head.pooler.spatial_scale == 1 / 16


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


def test_proposals_json_round_trip(tmp_path):
    proposals = {3: torch.tensor([[1.0, 2.0, 11.0, 22.0, 0.9], [0.0, 0.0, 5.0, 5.0, 0.1]]),
                 8: torch.tensor([[4.0, 4.0, 8.0, 9.0, 0.5]])}
    path = tmp_path / "proposals.json"
    save_proposals(path, proposals)
    assert json.loads(path.read_text())[0] == {"image_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0],
                                                 "score": pytest.approx(0.9)}
    loaded = load_proposals(path, with_scores=True)
    assert loaded.keys() == proposals.keys()
    assert all(torch.allclose(loaded[k], proposals[k]) for k in proposals)
    assert torch.allclose(load_proposals(path)[3], proposals[3][:, :4])


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ('{"image_id": 1}', "must hold a list"),
    ('[{"image_id": 1, "bbox": [0, 0, 10, 10]}, {"image_id": 5, "bbox": [0, 0, -1, 4]}]',
     r"entry 1 \(image_id 5\) has bbox \[0, 0, -1, 4\] with zero or negative width"),
    ('[{"image_id": "a.jpg", "bbox": [0, 0, 1, 1]}]', "entry 0 has image_id 'a.jpg'; expected an integer"),
    ('[{"image_id": 2, "bbox": [0, 0, 1]}]', r"entry 0 \(image_id 2\) has bbox \[0, 0, 1\]; expected \[x, y, w, h\]"),
])
def test_bad_proposals_file_names_the_file_and_the_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProposalFileError, match=message) as info:
        load_proposals(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_proposals(tmp_path / "missing.json")


def test_model_uses_the_proposals_file_by_image_id(tmp_path):
    path = tmp_path / "proposals.json"
    boxes = {7: torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 70.0]]), 9: torch.tensor([[0.0, 0, 9, 9]])}
    save_proposals(path, boxes)
    model = build("fast_rcnn", *SMALL_VGG, f"model.proposals_file={path}").eval()
    seen = []
    model.head.register_forward_hook(lambda _, args, __: seen.append(args[1]))
    model(torch.rand(2, 3, 64, 64), image_ids=[9, 7])
    assert torch.equal(seen[0][0], boxes[9]) and torch.equal(seen[0][1], boxes[7].clamp(max=64))
    # From targets: original image pixels → letterboxed input pixels (× ratio, + pad).
    seen.clear()
    model(torch.rand(1, 3, 64, 64), [{"image_id": 7, "ratio": 0.5, "pad": (2.0, 6.0)}])
    assert torch.equal(seen[0][0], boxes[7] * 0.5 + torch.tensor([2.0, 6.0, 2.0, 6.0]))
    with pytest.raises(ValueError, match="image_ids=... or targets with 'image_id'"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ProposalFileError, match=r"proposals.json' has no proposals for image_id 4"):
        model(torch.rand(1, 3, 64, 64), image_ids=[4])
    with pytest.raises(ProposalFileError, match="no proposals for image_id 4"):
        proposals_for(load_proposals(path), 4, path)


def test_tiny_config_overfits_two_images(toy_batch, precise_batchnorm):
    model = instantiate(compose_config("train", ["model=fast_rcnn_tiny"]).model, num_classes=3)
    overfit(model, *toy_batch, steps=80, lr=0.003, shrink=0.3)
    precise_batchnorm(model, *toy_batch)
    assert_finds_the_boxes(model, *toy_batch)
