"""Box geometry shared by every detector: formats, the IoU family, coders, clipping.

Pure tensor functions, no state. Boxes are xyxy in absolute pixels unless a name says otherwise. Pairwise
IoU variants come from ``torchvision.ops``; what torchvision lacks is written here: the elementwise IoU family
(values, not only losses, and finite for degenerate boxes) and the box coders of the zoo.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, complete_box_iou, distance_box_iou, generalized_box_iou

__all__ = [
    "box_convert", "pairwise_iou", "elementwise_iou", "clip_boxes", "remove_small", "DeltaCoder", "YOLOCoder",
    "CellCoder",
]

_PAIRWISE = {"iou": box_iou, "giou": generalized_box_iou, "diou": distance_box_iou, "ciou": complete_box_iou}


def pairwise_iou(boxes1: Tensor, boxes2: Tensor, kind: str = "iou") -> Tensor:
    """(N, M) IoU / GIoU / DIoU / CIoU between every box of ``boxes1`` (N, 4) and ``boxes2`` (M, 4), xyxy."""
    if kind not in _PAIRWISE:
        raise ValueError(f"unknown IoU kind {kind!r}; expected one of {sorted(_PAIRWISE)}")
    return _PAIRWISE[kind](boxes1, boxes2)


def elementwise_iou(boxes1: Tensor, boxes2: Tensor, kind: str = "iou", eps: float = 1e-7) -> Tensor:
    """IoU-family value of each pair ``boxes1[i]``, ``boxes2[i]`` (both (..., 4) xyxy) → (...).

    - ``giou`` = IoU − |C \\ (A ∪ B)| / |C|, C the smallest enclosing box (Rezatofighi et al. 2019);
    - ``diou`` = IoU − ρ²(centres) / c², c the diagonal of C (Zheng et al. 2020);
    - ``ciou`` = DIoU − α·v, v = 4/π² (atan(w_g/h_g) − atan(w/h))², α = v / (1 − IoU + v) taken without
      gradient, as in the paper.

    Degenerate boxes (zero width or height, identical or far-apart boxes) give finite values.
    """
    if kind not in _PAIRWISE:
        raise ValueError(f"unknown IoU kind {kind!r}; expected one of {sorted(_PAIRWISE)}")
    x1, y1, x2, y2 = boxes1.unbind(-1)
    gx1, gy1, gx2, gy2 = boxes2.unbind(-1)
    w1, h1 = (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)
    w2, h2 = (gx2 - gx1).clamp(min=0), (gy2 - gy1).clamp(min=0)
    inter = (torch.min(x2, gx2) - torch.max(x1, gx1)).clamp(min=0) * (torch.min(y2, gy2) - torch.max(y1, gy1)).clamp(
        min=0
    )
    union = w1 * h1 + w2 * h2 - inter
    iou = inter / (union + eps)
    if kind == "iou":
        return iou
    cw = torch.max(x2, gx2) - torch.min(x1, gx1)
    ch = torch.max(y2, gy2) - torch.min(y1, gy1)
    if kind == "giou":
        enclosing = cw * ch
        return iou - (enclosing - union) / (enclosing + eps)
    rho2 = ((x1 + x2 - gx1 - gx2) ** 2 + (y1 + y2 - gy1 - gy2) ** 2) / 4
    diou = iou - rho2 / (cw**2 + ch**2 + eps)
    if kind == "diou":
        return diou
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip (..., 4) xyxy boxes to an image of ``size`` = (height, width)."""
    h, w = size
    return torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                        boxes[..., 3].clamp(0, h)], dim=-1)


def remove_small(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the (N, 4) xyxy boxes whose width and height are both at least ``min_size``."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.nonzero((wh >= min_size).all(dim=1)).squeeze(1)


class DeltaCoder:
    """Fast R-CNN box coding: (tx, ty, tw, th) = (wx·Δx/w_a, wy·Δy/h_a, ww·log(w/w_a), wh·log(h/h_a)).

    ``weights`` scale the deltas (Fast R-CNN's stage-two heads use (10, 10, 5, 5)); decoding clamps tw, th
    at ``log(1000/16)`` so an untrained head cannot overflow exp.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights, self.clamp = weights, clamp

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """(N, 4) deltas taking ``anchors`` (N, 4) onto ``boxes`` (N, 4), both xyxy."""
        wx, wy, ww, wh = self.weights
        a = box_convert(anchors, "xyxy", "cxcywh")
        b = box_convert(boxes, "xyxy", "cxcywh")
        return torch.stack([wx * (b[:, 0] - a[:, 0]) / a[:, 2], wy * (b[:, 1] - a[:, 1]) / a[:, 3],
                            ww * torch.log(b[:, 2] / a[:, 2]), wh * torch.log(b[:, 3] / a[:, 3])], dim=1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(N, 4) xyxy boxes from ``deltas`` (N, 4) applied to ``anchors`` (N, 4) xyxy."""
        wx, wy, ww, wh = self.weights
        a = box_convert(anchors, "xyxy", "cxcywh")
        cx = deltas[:, 0] / wx * a[:, 2] + a[:, 0]
        cy = deltas[:, 1] / wy * a[:, 3] + a[:, 1]
        w = torch.exp((deltas[:, 2] / ww).clamp(max=self.clamp)) * a[:, 2]
        h = torch.exp((deltas[:, 3] / wh).clamp(max=self.clamp)) * a[:, 3]
        return box_convert(torch.stack([cx, cy, w, h], dim=1), "cxcywh", "xyxy")


class YOLOCoder:
    """YOLOv2+ direct location prediction: b_xy = (σ(t_xy) + c_xy)·stride, b_wh = p_wh·e^{t_wh}.

    ``encode`` returns the raw targets (t_x, t_y, t_w, t_h) for a box whose centre lies in cell ``cells``;
    offsets are clamped to [eps, 1 − eps] before the logit so a centre on a cell border stays finite.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def encode(self, boxes: Tensor, cells: Tensor, anchors: Tensor, stride: float) -> Tensor:
        """``boxes`` (N, 4) xyxy pixels, ``cells`` (N, 2) integer (x, y) cell indices, ``anchors`` (N, 2) (w, h)
        pixels → (N, 4) raw targets."""
        c = box_convert(boxes, "xyxy", "cxcywh")
        offset = (c[:, :2] / stride - cells).clamp(self.eps, 1 - self.eps)
        return torch.cat([torch.logit(offset), torch.log(c[:, 2:] / anchors)], dim=1)

    def decode(self, t: Tensor, cells: Tensor, anchors: Tensor, stride: float) -> Tensor:
        """(N, 4) raw predictions → (N, 4) xyxy pixels."""
        xy = (t[:, :2].sigmoid() + cells) * stride
        wh = anchors * t[:, 2:].exp()
        return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)


class CellCoder:
    """YOLOv1 coding on an S×S grid: (x, y) offset of the centre inside its cell, and (√w, √h) relative to the
    image, so that errors on small boxes weigh more than the same errors on large ones."""

    def __init__(self, grid: int = 7) -> None:
        self.grid = grid

    def encode(self, boxes: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``boxes`` (N, 4) xyxy pixels of an image of ``size`` = (height, width) → (cells (N, 2) integer (x, y)
        indices, targets (N, 4) = (x offset, y offset, √(w/W), √(h/H)))."""
        h, w = size
        c = box_convert(boxes, "xyxy", "cxcywh")
        scaled = c[:, :2] / c.new_tensor([w, h]) * self.grid
        cells = scaled.floor().clamp(0, self.grid - 1)
        rel_wh = (c[:, 2:] / c.new_tensor([w, h])).clamp(min=0).sqrt()
        return cells.long(), torch.cat([scaled - cells, rel_wh], dim=1)

    def decode(self, targets: Tensor, cells: Tensor, size: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`encode`: (N, 4) xyxy pixels."""
        h, w = size
        scale = targets.new_tensor([w, h])
        xy = (targets[:, :2] + cells) / self.grid * scale
        wh = targets[:, 2:] ** 2 * scale
        return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
