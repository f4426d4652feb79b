"""Box regression losses on paired boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.boxes import elementwise_iou

BOX_LOSSES = ("iou", "giou", "diou", "ciou", "smooth_l1", "l1", "mse")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum() * 0.0
    raise ValueError(f"unknown reduction {reduction!r}; expected none, mean or sum")


def box_loss(pred: Tensor, target: Tensor, kind: str = "ciou", reduction: str = "mean", weight: Tensor | None = None,
             beta: float = 1.0, eps: float = 1e-7) -> Tensor:
    """Loss between paired boxes ``pred`` and ``target`` (N, 4).

    IoU kinds take xyxy boxes: ``iou`` is −ln(IoU) (UnitBox, Yu et al. 2016), ``giou``/``diou``/``ciou`` are
    1 − GIoU/DIoU/CIoU (see :func:`detkit.boxes.elementwise_iou`). Coordinate kinds (``smooth_l1`` with
    ``beta``, ``l1``, ``mse``) compare whatever encoding the caller passes (deltas, offsets) and sum over the
    4 coordinates. ``weight`` (N,) scales each pair before the reduction.
    """
    if kind == "iou":
        loss = -torch.log(elementwise_iou(pred, target, "iou", eps).clamp(min=eps))
    elif kind in ("giou", "diou", "ciou"):
        loss = 1.0 - elementwise_iou(pred, target, kind, eps)
    elif kind == "smooth_l1":
        loss = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(-1)
    elif kind == "l1":
        loss = (pred - target).abs().sum(-1)
    elif kind == "mse":
        loss = ((pred - target) ** 2).sum(-1)
    else:
        raise ValueError(f"unknown box loss {kind!r}; expected one of {', '.join(BOX_LOSSES)}")
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)
