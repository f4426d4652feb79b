"""SSD's MultiBox loss (Liu et al. 2016): prior matching, offset regression and confidence with hard negatives.

Class index 0 is the background here (the head's softmax column 0); object class c is column c + 1. The
detector maps its outputs back to 0-based object labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from detkit.boxes import DeltaCoder
from detkit.losses.box import box_loss
from detkit.matching import hard_negative_mask, match_atss, match_by_iou

__all__ = ["MATCHERS", "ssd_coder", "match_priors", "multibox_loss"]

MATCHERS = ("iou", "atss")


def ssd_coder(variances: Sequence[float] = (0.1, 0.2)) -> DeltaCoder:
    """SSD's offsets, (Δcx/w_a/v₀, Δcy/h_a/v₀, log(w/w_a)/v₁, log(h/h_a)/v₁): Fast R-CNN's deltas with weights
    1/variance."""
    v_xy, v_wh = variances
    return DeltaCoder((1 / v_xy, 1 / v_xy, 1 / v_wh, 1 / v_wh))


def match_priors(priors: Tensor, boxes: Tensor, labels: Tensor, iou_threshold: float = 0.5, matcher: str = "iou",
                 level_sizes: Sequence[int] | None = None, topk: int = 9) -> tuple[Tensor, Tensor]:
    """The matching of one image. ``matcher="iou"`` is SSD's: a prior is positive when its IoU with a ground
    truth exceeds ``iou_threshold``, and every ground truth also gets the prior it overlaps most. ``"atss"`` is
    ATSS's (:func:`~detkit.matching.match_atss`: each ground truth's threshold from its ``topk`` nearest priors of
    each level; needs ``level_sizes``, the priors per level) added to SSD's: a prior is positive when either
    rule makes it so, for the ground truth SSD's rule gives it where both do.

    Args:
        priors: (A, 4) xyxy pixels. boxes: (G, 4) xyxy pixels. labels: (G,) 0-based object classes.

    Returns:
        classes (A,) long, 0 background and c + 1 for object class c; matched boxes (A, 4) xyxy (the prior
        itself where background, so that encoding stays finite).
    """
    if matcher not in MATCHERS:
        raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
    iou = box_iou(boxes, priors)
    matches = match_by_iou(iou, iou_threshold, iou_threshold, allow_low_quality=True)
    if matcher == "atss":
        if level_sizes is None:
            raise ValueError("the atss matcher needs level_sizes, the priors of each level")
        # SSD's positives stay positive: ATSS adds boxes for the objects no box overlaps well, and takes none away
        # from those many boxes overlap (large objects on a fine grid of large boxes).
        matches = torch.where(matches >= 0, matches, match_atss(iou, priors, boxes, level_sizes, topk))
    positive = matches >= 0
    index = matches.clamp(min=0)
    classes = torch.where(positive, labels[index] + 1, 0) if len(boxes) else torch.zeros_like(matches)
    matched = torch.where(positive[:, None], boxes[index], priors) if len(boxes) else priors.clone()
    return classes, matched


def multibox_loss(cls_logits: Tensor, box_deltas: Tensor, priors: Tensor, targets: Sequence[dict],
                  iou_threshold: float = 0.5, neg_pos_ratio: float = 3.0, variances: Sequence[float] = (0.1, 0.2),
                  box_weight: float = 1.0, matcher: str = "iou", level_sizes: Sequence[int] | None = None,
                  topk: int = 9) -> dict[str, Tensor]:
    """L = (L_conf + α·L_loc) / N over a batch, N the number of positive priors (at least 1).

    L_loc is smooth-L1 (β = 1) between predicted and target offsets (:func:`ssd_coder`) of positives; L_conf is
    the softmax cross-entropy of positives and of the ⌊``neg_pos_ratio``·positives⌋ negatives of each image
    with the highest loss (all of them if fewer), chosen by :func:`~detkit.matching.hard_negative_mask`.

    Args:
        cls_logits: (B, A, C + 1) with column 0 the background. box_deltas: (B, A, 4) predicted offsets.
        priors: (A, 4) xyxy pixels. targets: per image ``boxes`` (G, 4) xyxy pixels and ``labels`` (G,) 0-based.
        matcher, level_sizes, topk: which priors are positive (:func:`match_priors`).

    Returns:
        ``loss_box`` (α·L_loc / N) and ``loss_cls`` (L_conf / N), float32 scalars.
    """
    cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
    classes, matched = zip(*(match_priors(priors, t["boxes"].to(priors), t["labels"].to(priors.device),
                                          iou_threshold, matcher, level_sizes, topk) for t in targets))
    classes, matched = torch.stack(classes), torch.stack(matched)
    positive = classes > 0
    num_pos = positive.sum().clamp(min=1)
    coder = ssd_coder(variances)
    target_deltas = coder.encode(matched[positive], priors.expand_as(matched)[positive])
    loc = box_loss(box_deltas[positive], target_deltas, "smooth_l1", reduction="sum")
    ce = F.cross_entropy(cls_logits.flatten(0, 1), classes.flatten(), reduction="none").view_as(classes)
    # A negative's cross-entropy is −log p(background): the ranking SSD mines with.
    chosen = hard_negative_mask(ce, positive, neg_pos_ratio)
    conf = ce[chosen].sum()
    return {"loss_box": box_weight * loc / num_pos, "loss_cls": conf / num_pos}
