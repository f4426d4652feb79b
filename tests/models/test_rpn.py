import pytest
import torch
from torchvision.ops import box_iou

from detkit.anchors import grid_anchors
from detkit.matching import BACKGROUND, IGNORE
from detkit.models.rpn import RegionProposalNetwork, sample_anchors

SIZES = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # P2–P6 of a 128 px input
STRIDES = [4, 8, 16, 32, 64]


def maps(batch: int = 2, channels: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in SIZES]


def test_15_anchors_one_size_per_level_three_ratios():
    rpn = RegionProposalNetwork(8)
    assert rpn.num_anchors == 3 and len(rpn.sizes) == 5  # 5 levels x 3 = 15 anchor shapes
    anchors = rpn.anchors(SIZES, STRIDES)
    shapes = set()
    for a, (h, w), size in zip(anchors, SIZES, (32, 64, 128, 256, 512)):
        assert a.shape == (h * w * 3, 4)
        wh = a[:3, 2:] - a[:3, :2]
        assert torch.allclose(wh.prod(1).sqrt(), torch.full((3,), float(size)))
        assert torch.allclose(wh[:, 1] / wh[:, 0], torch.tensor([0.5, 1.0, 2.0]))
        shapes |= {tuple(s) for s in wh.round().tolist()}
    assert len(shapes) == 15
    assert all(torch.equal(a, b) for a, b in zip(anchors, grid_anchors(SIZES, STRIDES)))


def test_head_outputs_line_up_with_the_anchors():
    rpn = RegionProposalNetwork(8)
    objectness, deltas = rpn.head(maps())
    total = sum(h * w * 3 for h, w in SIZES)
    assert objectness.shape == (2, total) and deltas.shape == (2, total, 4)
    # Anchor 0 of cell (i, j) of P2 reads the cell's own location: change one input pixel, see which move.
    x = maps()
    x[0][:, :, 5, 7] += 100.0
    changed = (rpn.head(x)[0] - objectness).abs()[0, :32 * 32 * 3] > 0
    changed_cells = torch.nonzero(changed).squeeze(1) // 3
    assert (5 * 32 + 7) in changed_cells.tolist()


def test_sample_anchors_caps_positives_and_skips_ignored():
    torch.manual_seed(0)
    matches = torch.full((2000,), BACKGROUND)
    matches[:300] = 0
    matches[300:400] = IGNORE
    pos, neg = sample_anchors(matches, 256, 0.5)
    assert len(pos) == 128 and len(neg) == 128
    assert (matches[pos] >= 0).all() and (matches[neg] == BACKGROUND).all()
    matches[10:300] = BACKGROUND
    pos, neg = sample_anchors(matches, 256, 0.5)
    assert len(pos) == 10 and len(neg) == 246


def test_proposals_are_clipped_capped_and_use_the_train_or_test_top_k():
    rpn = RegionProposalNetwork(8, pre_nms_topk={"train": 40, "test": 4}, post_nms_topk={"train": 30, "test": 12})
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(maps(), (120, 100), strides=STRIDES)
    assert losses == {} and len(proposals) == 2
    for p in proposals:
        assert 0 < len(p) <= 12  # at most 4 per level before NMS, 12 kept
        assert (p[:, 0::2] >= 0).all() and (p[:, 0::2] <= 100).all() and (p[:, 1::2] <= 120).all()
        assert (p[:, 2:] > p[:, :2]).all()
    rpn.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([0])}] * 2
    proposals, losses = rpn(maps(), (120, 100), targets, STRIDES)
    assert max(len(p) for p in proposals) > 12 and all(len(p) <= 30 for p in proposals)
    assert set(losses) == {"loss_objectness", "loss_rpn_box"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())


def test_rpn_learns_to_propose_the_object():
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(8, pre_nms_topk={"train": 20, "test": 100}, post_nms_topk={"train": 20, "test": 5})
    x = maps(batch=1)
    gt = torch.tensor([[20.0, 30.0, 70.0, 60.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([0])}]
    optimizer = torch.optim.Adam(rpn.parameters(), lr=3e-2)
    for _ in range(30):
        loss = sum(rpn(x, (128, 128), targets, STRIDES)[1].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rpn.eval()
    with torch.no_grad():
        proposals, _ = rpn(x, (128, 128), strides=STRIDES)
    assert box_iou(proposals[0][:1], gt).item() > 0.7


def test_bad_inputs_are_named():
    rpn = RegionProposalNetwork(8)
    with pytest.raises(ValueError, match="5 levels, got 4"):
        rpn(maps()[:4], (128, 128))
    with pytest.raises(ValueError, match="targets are required"):
        rpn(maps(), (128, 128))
    with pytest.raises(ValueError, match="train and a test"):
        RegionProposalNetwork(8, pre_nms_topk={"train": 10})
    with pytest.raises(ValueError, match="same number of anchors"):
        RegionProposalNetwork(8, sizes=[[32], [64, 128]])
