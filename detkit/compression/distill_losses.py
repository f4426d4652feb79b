"""Distillation losses for dense detectors: pure functions of per-anchor predictions, no state.

- :func:`logit_kd_loss`: Hinton et al. 2015 at temperature T, as a KL divergence so that its minimum is 0
  (student = teacher): a softmax KL for softmax heads, binary KLs (BCE to the teacher's soft targets, less
  their entropy) for sigmoid heads.
- :func:`bounded_regression_loss`: Chen et al., NeurIPS 2017 — the teacher as an upper bound: a positive
  anchor's L2 regression error counts only while the student is not better than the teacher by a margin.
- :func:`imitation_mask` and :func:`imitation_loss`: Wang et al., CVPR 2019 — L2 between adapted student
  features and teacher features at the locations near objects.

Boxes are xyxy in input pixels; N anchors are in a detector's own order (see
:class:`~detkit.compression.distill_adapters.DenseOutputs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from detkit.boxes import DeltaCoder
from detkit.matching import match_by_iou

__all__ = ["binary_kl", "logit_kd_loss", "bounded_regression_loss", "imitation_mask", "imitation_loss"]

_CODER = DeltaCoder()  # (Δx/w_a, Δy/h_a, log w/w_a, log h/h_a): errors in units of the anchor's size


def binary_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(σ(teacher)) ‖ Bernoulli(σ(student))) from logits of any shape: the BCE of the
    student to the teacher's soft target minus that target's entropy (≥ 0, 0 where the logits are equal)."""
    target = teacher.sigmoid()
    return (F.binary_cross_entropy_with_logits(student, target, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher, target, reduction="none"))


def logit_kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, softmax: bool = True,
                  student_objectness: Tensor | None = None, teacher_objectness: Tensor | None = None) -> Tensor:
    """Logit distillation at ``temperature`` T, scaled by T² (gradients keep their size as T changes).

    Args:
        student, teacher: (B, N, K) class logits of the same anchors.
        softmax: K-way softmax (SSD, background in column 0): KL(p_t ‖ p_s) summed over K, mean over anchors.
            Else K independent sigmoids (YOLO): binary KL per class, mean over K (as YOLO's own class BCE),
            each anchor weighted by the teacher's objectness probability σ(o_t) (class scores only mean
            something where there is an object).
        student_objectness, teacher_objectness: (B, N) objectness logits of sigmoid heads: their binary KL,
            mean over all anchors, is added.

    Returns:
        scalar ≥ 0 (up to rounding), 0 when the student's logits equal the teacher's.
    """
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    student, teacher = student.float() / t, teacher.float() / t
    if softmax:
        kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none")
        return kl.sum(-1).mean() * t * t
    per_anchor = binary_kl(student, teacher).mean(-1)
    if teacher_objectness is None or student_objectness is None:
        return per_anchor.mean() * t * t
    weight = teacher_objectness.float().sigmoid()
    classes = (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)
    objectness = binary_kl(student_objectness.float() / t, teacher_objectness.float() / t).mean()
    return (classes + objectness) * t * t


def _safe(boxes: Tensor, min_size: float = 1e-3) -> Tensor:
    """xyxy boxes with width and height at least ``min_size`` (log-size coding stays finite)."""
    return torch.cat([boxes[..., :2], torch.max(boxes[..., 2:], boxes[..., :2] + min_size)], dim=-1)


def bounded_regression_loss(student_boxes: Tensor, teacher_boxes: Tensor, priors: Tensor,
                            gt_boxes: Sequence[Tensor], margin: float = 0.0,
                            iou_threshold: float = 0.5) -> Tensor:
    """Teacher-bounded L2 regression loss (Chen et al. 2017), mean over positive anchors.

    A prior is positive when its IoU with a ground truth is ≥ ``iou_threshold``, or it is that ground truth's
    best prior (:func:`~detkit.matching.match_by_iou`). With y the offsets (Δx/w_a, Δy/h_a, log w/w_a,
    log h/h_a) from the prior to its ground truth and R_s, R_t those to the student's and teacher's boxes,
    the anchor contributes ‖R_s − y‖² if ‖R_s − y‖² + margin > ‖R_t − y‖², else 0: the student stops
    learning from this term where it beats the teacher by ``margin``.

    Args:
        student_boxes, teacher_boxes: (B, N, 4) decoded boxes, xyxy input pixels.
        priors: (N, 4) xyxy input pixels.
        gt_boxes: per image (G_i, 4) xyxy input pixels.

    Returns:
        scalar; 0 when no image has a ground truth.
    """
    total, count = student_boxes.new_zeros(()), 0
    for student, teacher, gt in zip(student_boxes.float(), teacher_boxes.float(), gt_boxes):
        if gt.numel() == 0:
            continue
        matches = match_by_iou(box_iou(gt.float(), priors), iou_threshold, iou_threshold)
        positive = matches >= 0
        anchors = priors[positive]
        target = _CODER.encode(gt.float()[matches[positive]], anchors)
        error_s = ((_CODER.encode(_safe(student[positive]), anchors) - target) ** 2).sum(-1)
        with torch.no_grad():
            error_t = ((_CODER.encode(_safe(teacher[positive]), anchors) - target) ** 2).sum(-1)
            counts = error_s + margin > error_t
        total = total + (error_s * counts).sum()
        count += int(positive.sum())
    return total / max(count, 1)


def imitation_mask(priors: Tensor, cells: Tensor, num_cells: int, gt_boxes: Sequence[Tensor],
                   psi: float = 0.5) -> Tensor:
    """Wang et al.'s fine-grained imitation mask: the locations near objects.

    For each ground truth, m = its largest IoU with any prior; the priors whose IoU with it exceeds ψ·m are
    kept, and a location is in the mask when any of its priors is kept for any ground truth.

    Args:
        priors: (N, 4) xyxy input pixels.
        cells: (N,) long, each prior's location in [0, num_cells) (all levels' H·W cells, concatenated).
        gt_boxes: per image (G_i, 4) xyxy input pixels.
        psi: ψ in (0, 1]; the paper's 0.5.

    Returns:
        (B, num_cells) bool.
    """
    if not 0 < psi <= 1:
        raise ValueError(f"psi must be in (0, 1], got {psi}")
    mask = torch.zeros(len(gt_boxes), num_cells, dtype=torch.bool, device=priors.device)
    for i, gt in enumerate(gt_boxes):
        if gt.numel() == 0:
            continue
        iou = box_iou(gt.float(), priors.float())  # (G, N)
        best = iou.max(dim=1, keepdim=True).values
        kept = ((iou > psi * best) & (best > 0)).any(dim=0)
        mask[i, cells[kept]] = True
    return mask


def imitation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor) -> Tensor:
    """Σ over masked locations and channels of (f_s − f_t)², over 2·(number of masked locations).

    Args:
        student: per level (B, C_l, H_l, W_l) adapted student features.
        teacher: per level the teacher's features, same shapes.
        mask: (B, Σ H_l·W_l) bool, levels concatenated, cells row-major (:func:`imitation_mask`).

    Returns:
        scalar; 0 with an empty mask.
    """
    squared = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"adapted student features {tuple(s.shape)} and teacher features {tuple(t.shape)} "
                             f"differ in shape: teacher and student must see the same input with the same strides")
        squared.append(((s.float() - t.float()) ** 2).sum(dim=1).flatten(1))  # (B, H·W)
    squared = torch.cat(squared, dim=1)
    if squared.shape != mask.shape:
        raise ValueError(f"imitation mask {tuple(mask.shape)} does not cover the features' {tuple(squared.shape)}")
    return (squared * mask).sum() / (2 * mask.sum().clamp(min=1))
