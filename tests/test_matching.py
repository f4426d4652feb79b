import pytest
import torch
from torchvision.ops import box_iou

from detkit.matching import BACKGROUND, IGNORE, hard_negative_mask, match_atss, match_by_iou


def test_thresholds_split_foreground_ignore_background():
    # 2 GTs × 5 anchors: anchor 0 clearly GT 0, 1 clearly GT 1, 2 in the ignore band, 3 and 4 background.
    iou = torch.tensor([[0.8, 0.1, 0.45, 0.2, 0.0],
                        [0.3, 0.9, 0.35, 0.1, 0.0]])
    out = match_by_iou(iou, fg_threshold=0.5, bg_threshold=0.4, allow_low_quality=False)
    assert out.tolist() == [0, 1, IGNORE, BACKGROUND, BACKGROUND]
    assert out.dtype == torch.long


def test_boundaries_fg_inclusive_bg_exclusive():
    iou = torch.tensor([[0.5, 0.4, 0.3999]])
    assert match_by_iou(iou, 0.5, 0.4, allow_low_quality=False).tolist() == [0, IGNORE, BACKGROUND]
    # Equal thresholds: nothing ignored.
    assert match_by_iou(iou, 0.4, 0.4, allow_low_quality=False).tolist() == [0, 0, BACKGROUND]


def test_low_quality_rescues_a_gt_without_a_good_anchor_ties_included():
    # GT 1 overlaps at most 0.3, shared by anchors 2 and 3 (a tie); GT 0 is well matched by anchor 0.
    iou = torch.tensor([[0.9, 0.2, 0.0, 0.1],
                        [0.0, 0.1, 0.3, 0.3]])
    assert match_by_iou(iou, 0.7, 0.3, allow_low_quality=False).tolist() == [0, BACKGROUND, IGNORE, IGNORE]
    assert match_by_iou(iou, 0.7, 0.3, allow_low_quality=True).tolist() == [0, BACKGROUND, 1, 1]
    iou_low = iou.clone()
    iou_low[1, 2:] = 0.2
    assert match_by_iou(iou_low, 0.7, 0.3).tolist() == [0, BACKGROUND, 1, 1]


def test_low_quality_anchor_keeps_its_own_best_gt():
    # Anchor 1 is GT 1's best (0.4) but overlaps GT 0 more (0.6): as in Faster R-CNN it stays with GT 0.
    iou = torch.tensor([[0.9, 0.6],
                        [0.1, 0.4]])
    assert match_by_iou(iou, 0.7, 0.3).tolist() == [0, 0]


def test_gt_overlapping_nothing_claims_nothing_and_no_gt_means_background():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.1, 0.0]])
    assert match_by_iou(iou, 0.5, 0.4).tolist() == [1, BACKGROUND, BACKGROUND]
    assert match_by_iou(torch.zeros(0, 4), 0.5, 0.4).tolist() == [BACKGROUND] * 4
    with pytest.raises(ValueError):
        match_by_iou(iou, 0.3, 0.5)


def two_level_anchors():
    """A 12×12 grid of 8 px squares at stride 8 (level 0) and a 6×6 grid of 16 px squares at stride 16 (level 1)."""
    def level(stride, side, n):
        c = (torch.arange(n, dtype=torch.float) + 0.5) * stride
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        centres = torch.stack([cx.flatten(), cy.flatten()], 1)
        return torch.cat([centres - side / 2, centres + side / 2], 1)
    return torch.cat([level(8, 8, 12), level(16, 16, 6)]), [144, 36]


def test_atss_gives_a_small_object_several_positives_where_iou_05_gives_one():
    anchors, sizes = two_level_anchors()
    gt = torch.tensor([[30.0, 28.0, 42.0, 44.0]])  # 12×16 px: best IoU with any anchor is below 0.5
    iou = box_iou(gt, anchors)
    assert iou.max() < 0.5
    assert (match_by_iou(iou, 0.5, 0.5) == 0).sum() == 1  # SSD's rule: only the forced best anchor
    out = match_atss(iou, anchors, gt, sizes, topk=9)
    positive = out == 0
    assert positive.sum() >= 2 and set(out.unique().tolist()) <= {0, BACKGROUND}
    centres = (anchors[positive, :2] + anchors[positive, 2:]) / 2
    assert ((centres > gt[0, :2]) & (centres < gt[0, 2:])).all()  # every positive's centre inside the object
    # The rule itself: candidates are the 9 nearest per level; positive at or above their IoUs' mean + std.
    centres_all = (anchors[:, :2] + anchors[:, 2:]) / 2
    distance = (centres_all - (gt[0, :2] + gt[0, 2:]) / 2).norm(dim=1)
    candidates = torch.cat([distance[:144].topk(9, largest=False).indices,
                            distance[144:].topk(9, largest=False).indices + 144])
    threshold = iou[0, candidates].mean() + iou[0, candidates].std()
    inside = ((centres_all > gt[0, :2]) & (centres_all < gt[0, 2:])).all(1)
    expected = torch.zeros(len(anchors), dtype=torch.bool)
    expected[candidates] = (iou[0, candidates] >= threshold) & inside[candidates]
    assert torch.equal(positive, expected)


def test_atss_anchor_wanted_by_two_objects_goes_to_its_better_overlap():
    anchors, sizes = two_level_anchors()
    gts = torch.tensor([[16.0, 16.0, 48.0, 48.0], [28.0, 20.0, 56.0, 52.0]])  # overlapping: two anchors wanted by both
    iou = box_iou(gts, anchors)
    alone = [match_atss(iou[i : i + 1], anchors, gts[i : i + 1], sizes) == 0 for i in range(2)]
    shared = alone[0] & alone[1]
    assert iou[:, shared].argmax(dim=0).tolist() == [0, 1]  # one shared anchor overlaps each object more
    out = match_atss(iou, anchors, gts, sizes)
    assert torch.equal(out[shared], iou[:, shared].argmax(dim=0))
    assert torch.equal(out >= 0, alone[0] | alone[1])


def test_atss_object_that_lost_every_anchor_claims_its_best_candidate():
    anchors, sizes = two_level_anchors()
    gts = torch.tensor([[24.0, 24.0, 40.0, 40.0], [24.0, 24.0, 40.0, 40.0]])  # a duplicated annotation
    iou = box_iou(gts, anchors)
    out = match_atss(iou, anchors, gts, sizes)
    assert (out == 1).sum() == 1 and (out == 0).sum() >= 1  # ties went to object 0; object 1 claims one anchor
    assert iou[1, out == 1] == iou[1].max()
    assert match_atss(torch.zeros(0, len(anchors)), anchors, torch.zeros(0, 4), sizes).eq(BACKGROUND).all()
    with pytest.raises(ValueError, match="level_sizes sum to 100"):
        match_atss(iou, anchors, gts, [64, 36])


def reference_hard_negatives(loss, positive, ratio, min_negatives):
    out = []
    for row_loss, row_pos in zip(loss.tolist(), positive.tolist()):
        negatives = [a for a in range(len(row_pos)) if not row_pos[a]]
        negatives = sorted(negatives, key=lambda a: -row_loss[a])  # stable: lower index first on ties
        k = min(max(int(ratio * sum(row_pos)), min_negatives), len(negatives))
        chosen = set(negatives[:k])
        out.append([row_pos[a] or a in chosen for a in range(len(row_pos))])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio,min_negatives", [(3, 0), (3, 2), (1.5, 0), (10, 0)])
def test_hard_negative_mask_matches_reference(seed, ratio, min_negatives):
    g = torch.Generator().manual_seed(seed)
    batch, anchors = 4, 40
    loss = torch.rand(batch, anchors, generator=g)
    loss[:, ::7] = 0.5  # ties
    positive = torch.rand(batch, anchors, generator=g) < torch.tensor([[0.0], [0.05], [0.2], [0.6]])
    ours = hard_negative_mask(loss, positive, ratio, min_negatives)
    assert torch.equal(ours, reference_hard_negatives(loss, positive, ratio, min_negatives))


def test_hard_negative_mask_counts():
    loss = torch.arange(10.0).repeat(2, 1)
    positive = torch.zeros(2, 10, dtype=torch.bool)
    positive[0, 9] = True
    mask = hard_negative_mask(loss, positive, 3)
    # Image 0: the positive and the 3 highest-loss negatives (8, 7, 6); image 1: no positive, nothing.
    assert mask[0].nonzero().squeeze(1).tolist() == [6, 7, 8, 9]
    assert not mask[1].any()
    assert hard_negative_mask(loss, positive, 3, min_negatives=2)[1].nonzero().squeeze(1).tolist() == [8, 9]
