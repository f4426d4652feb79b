"""Which anchors learn from which ground truths, and which negatives count: IoU matching (Faster R-CNN, SSD,
RetinaNet), ATSS's adaptive matching and SSD's hard negative mining.

YOLO's shape-based assignment lives with its loss: :func:`detkit.losses.yolo.match_anchors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["BACKGROUND", "IGNORE", "match_by_iou", "match_atss", "hard_negative_mask"]

BACKGROUND = -1
IGNORE = -2


def match_by_iou(iou: Tensor, fg_threshold: float, bg_threshold: float, allow_low_quality: bool = True) -> Tensor:
    """Match each anchor to the ground truth it overlaps most.

    Args:
        iou: (G, A) IoU between G ground truths and A anchors (e.g. ``torchvision.ops.box_iou(gt, anchors)``).
        fg_threshold: an anchor whose best IoU is ≥ this is matched to that ground truth.
        bg_threshold: below this it is background; in [bg_threshold, fg_threshold) it is ignored (neither
            trained as object nor as background). Equal thresholds leave nothing ignored.
        allow_low_quality: every ground truth also claims the anchor(s) it overlaps most, ties included, so
            that no object goes without a positive (Faster R-CNN's second rule, as in detectron2). Such an
            anchor is matched to its own best ground truth, which is the claiming one unless another overlaps
            it as much or more. Ground truths that overlap no anchor at all (best IoU 0) claim nothing.

    Returns:
        (A,) long: matched ground-truth index ≥ 0, :data:`BACKGROUND` (−1) or :data:`IGNORE` (−2). With G = 0
        every anchor is background.
    """
    if bg_threshold > fg_threshold:
        raise ValueError(f"bg_threshold {bg_threshold} must not exceed fg_threshold {fg_threshold}")
    num_gt, num_anchors = iou.shape
    if num_gt == 0:
        return torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=iou.device)
    best_iou, matches = iou.max(dim=0)
    out = matches.clone()
    out[best_iou < fg_threshold] = IGNORE
    out[best_iou < bg_threshold] = BACKGROUND
    if allow_low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values
        claimed = ((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)
        out[claimed] = matches[claimed]
    return out


def match_atss(iou: Tensor, anchors: Tensor, boxes: Tensor, level_sizes: Sequence[int], topk: int = 9) -> Tensor:
    """ATSS's adaptive training sample selection (Zhang et al., CVPR 2020): each ground truth picks its own IoU
    threshold from the anchors near it.

    On every level the ``topk`` anchors whose centres are nearest the ground truth's centre are its candidates;
    its threshold is the mean plus the standard deviation of the candidates' IoUs (over all levels); candidates
    at or above it, with their centre inside the box and IoU > 0, are positive. An anchor positive for several
    ground truths goes to the one it overlaps most. A small object, whose best anchors all overlap it little,
    still gets positives on its best-fitting level, where a fixed threshold (SSD's 0.5) leaves it only its
    single best anchor. An object left with no anchor (its positives all won by neighbours) claims its
    highest-IoU candidate, as SSD's matching gives every object its best prior.

    Args:
        iou: (G, A) IoU between G ground truths and A anchors. anchors: (A, 4) xyxy. boxes: (G, 4) xyxy.
        level_sizes: anchors per level, in the order of ``anchors`` (sum A).
        topk: candidates per level (fewer on a level that has fewer anchors).

    Returns:
        (A,) long: matched ground-truth index ≥ 0, or :data:`BACKGROUND` (−1); nothing is ignored.
    """
    num_gt, num_anchors = iou.shape
    if sum(level_sizes) != num_anchors:
        raise ValueError(f"level_sizes sum to {sum(level_sizes)} but there are {num_anchors} anchors")
    if num_gt == 0:
        return torch.full((num_anchors,), BACKGROUND, dtype=torch.long, device=iou.device)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distance = torch.cdist((boxes[:, :2] + boxes[:, 2:]) / 2, anchor_centres)
    candidates, start = [], 0
    for size in level_sizes:
        nearest = distance[:, start : start + size].topk(min(topk, size), dim=1, largest=False).indices
        candidates.append(nearest + start)
        start += size
    candidates = torch.cat(candidates, dim=1)
    candidate_iou = iou.gather(1, candidates)
    spread = candidate_iou.std(dim=1, correction=1 if candidates.shape[1] > 1 else 0)
    threshold = candidate_iou.mean(dim=1) + spread
    centres = anchor_centres[candidates]
    inside = (centres > boxes[:, None, :2]).all(-1) & (centres < boxes[:, None, 2:]).all(-1)
    positive = (candidate_iou >= threshold[:, None]) & inside & (candidate_iou > 0)
    kept = torch.full_like(iou, -1.0).scatter_(1, candidates, torch.where(positive, candidate_iou, -1.0))
    best, matches = kept.max(dim=0)
    out = torch.where(best >= 0, matches, BACKGROUND)
    # An object left without an anchor (its positives all won by neighbours, or none inside it) claims its best
    # candidate, as SSD's matching gives every object its best prior.
    orphans = torch.ones(num_gt, dtype=torch.bool, device=iou.device)
    orphans[out[out >= 0]] = False
    best_iou, best_candidate = candidate_iou.max(dim=1)
    orphans &= best_iou > 0
    out[candidates[orphans, best_candidate[orphans]]] = torch.nonzero(orphans).flatten()
    return out


def hard_negative_mask(loss: Tensor, positive: Tensor, neg_pos_ratio: float = 3.0, min_negatives: int = 0) -> Tensor:
    """SSD's hard negative mining (Liu et al. 2016): positives plus the highest-loss negatives of each image.

    Args:
        loss: (B, A) per-anchor classification loss (e.g. background cross-entropy); only its order among the
            negatives matters, and it is read without gradient. Assumed finite.
        positive: (B, A) bool, anchors matched to an object.
        neg_pos_ratio: each image keeps ⌊ratio · its number of positives⌋ negatives (at most all it has).
        min_negatives: at least this many negatives per image. The default 0 is SSD's: an image without
            positives contributes nothing; a positive value keeps background-only images in training.

    Returns:
        (B, A) bool: positives, and the chosen negatives. Among negatives of equal loss the lower anchor
        index is chosen first.
    """
    positive = positive.bool()
    loss = loss.detach()
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = (num_pos * neg_pos_ratio).floor().long().clamp(min=min_negatives)
    num_neg = torch.min(num_neg, (~positive).sum(dim=1, keepdim=True))
    # Positives sort last, so the first num_neg ranks are all negatives; rank = position in the sorted order.
    ranked = loss.masked_fill(positive, float("-inf"))
    order = ranked.sort(dim=1, descending=True, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return positive | (rank < num_neg)
