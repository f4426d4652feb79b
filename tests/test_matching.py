import pytest
import torch

from detkit.matching import BACKGROUND, IGNORE, hard_negative_mask, match_by_iou


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
