"""Focal losses (Lin et al. 2017): binary per-class (RetinaNet) and multi-class softmax.

Smooth L1 with ``beta`` lives in :func:`detkit.losses.box.box_loss` (``kind="smooth_l1"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss as _tv_sigmoid_focal_loss

from detkit.losses.box import _reduce

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float | None = 0.25, gamma: float = 2.0,
                       reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Binary focal loss of every element, as RetinaNet uses over (anchor, class) pairs.

    ``−α_t (1 − p_t)^γ log p_t`` with p = σ(logits); α_t = α for targets 1 and 1 − α for targets 0;
    ``alpha=None`` weighs both alike. ``logits`` and ``targets`` (any shape, same) are float, targets in [0, 1].
    ``weight`` (broadcastable to ``logits``) scales each element before the reduction. RetinaNet takes
    ``reduction="sum"`` and divides by its number of positive anchors.
    """
    # torchvision disables α with a negative value; None says so more plainly.
    loss = _tv_sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=-1.0 if alpha is None else alpha,
                                  gamma=gamma, reduction="none")
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def softmax_focal_loss(logits: Tensor, labels: Tensor, alpha: float | Tensor | None = None, gamma: float = 2.0,
                       reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Multi-class focal loss ``−α_y (1 − p_y)^γ log p_y``, p = softmax(logits).

    Args:
        logits: (N, C) raw class scores.
        labels: (N,) long class indices; entries equal to ``ignore_index`` contribute nothing.
        alpha: None (no weighting), a scalar applied to every sample, or a (C,) per-class weight indexed by
            the label.
        gamma: focusing exponent; ``gamma=0`` with ``alpha=None`` is cross-entropy.
        reduction: ``none`` gives (N,) with 0 at ignored entries; ``mean`` averages over the non-ignored
            samples (not over the α weights, unlike ``F.cross_entropy(weight=...)``); ``sum``.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    log_pt = F.log_softmax(logits, dim=-1).gather(-1, safe[:, None]).squeeze(-1)
    # 1 − p_t as −expm1(log p_t): exact for well-classified samples, where focal loss lives. γ = 0 skips the
    # power, whose gradient at p_t = 1 would be 0·∞.
    one_minus_pt = -torch.expm1(log_pt)
    loss = -(one_minus_pt**gamma) * log_pt if gamma else -log_pt
    if alpha is not None:
        loss = loss * (alpha.to(loss)[safe] if isinstance(alpha, Tensor) else alpha)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    return _reduce(loss, reduction)
