"""YOLOv1's sum-squared loss (Redmon et al. 2016) on an S×S grid with B boxes per cell.

Per image, summed, then averaged over the batch:
``λ_coord Σ_resp [(x − x̂)² + (y − ŷ)² + (√w − √ŵ)² + (√h − √ĥ)²] + Σ_resp (C − IoU)² + λ_noobj Σ_other C²
+ Σ_cells-with-object Σ_c (p(c) − p̂(c))²``, where (x, y) is the centre inside its cell, (√w, √h) image-relative
(:class:`detkit.boxes.CellCoder`), "resp" is the one of B predictors of the cell holding the GT centre whose
box has the highest IoU with the GT, and its confidence target is that IoU.

``class_cells="covered"`` (not the paper's rule; off in every config) trains the class values of every cell whose
centre lies inside a GT box, not only of the cell holding its centre: the class of the smallest such box, the cells
holding a centre keeping their own object's class. The paper's Figure 2 draws Pr(class | object) as such a map
covering each object. It helped squared-error classes a little and softmax classes not at all (README, "YOLOv1's
head"). ``class_softmax`` (yolov1_cpu) trains the class values as softmax logits by cross-entropy instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.boxes import CellCoder, elementwise_iou


def responsible_predictor(pred_boxes: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """The predictor responsible for each GT: the highest-IoU one among the B of its cell.

    Args:
        pred_boxes: (M, B, 4) xyxy, the B predicted boxes of the cell holding each GT's centre.
        gt: (M, 4) xyxy.

    Returns:
        (index (M,) long in [0, B), its IoU (M,) with the GT).
    """
    iou = elementwise_iou(pred_boxes, gt[:, None].expand_as(pred_boxes), "iou")
    best, index = iou.max(dim=1)
    return index, best


CLASS_CELLS = ("center", "covered")


def covered_cells(boxes: Tensor, grid: int, size: Sequence[int]) -> Tensor:
    """(S, S) long: per cell [row, column], the index into ``boxes`` (K, 4) xyxy pixels of the smallest box that
    contains the cell's centre, or -1 when none does; ``size`` = (H, W)."""
    if not len(boxes):
        return torch.full((grid, grid), -1, dtype=torch.long, device=boxes.device)
    h, w = size
    centre = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid
    cy, cx = torch.meshgrid(centre * h, centre * w, indexing="ij")
    inside = ((cx[None] >= boxes[:, 0, None, None]) & (cx[None] < boxes[:, 2, None, None])
              & (cy[None] >= boxes[:, 1, None, None]) & (cy[None] < boxes[:, 3, None, None]))  # (K, S, S)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    ranked = torch.where(inside, area[:, None, None], torch.inf)
    smallest, index = ranked.min(dim=0)
    return torch.where(torch.isfinite(smallest), index, -1)


def _one_per_cell(key: Tensor) -> Tensor:
    # YOLOv1 can predict one object per cell: of GTs sharing a cell, the first listed is kept.
    first = torch.full((int(key.max()) + 1,), len(key), device=key.device, dtype=torch.long)
    first.scatter_reduce_(0, key, torch.arange(len(key), device=key.device), "amin")
    return first[key] == torch.arange(len(key), device=key.device)


class YOLOv1Loss(nn.Module):
    """Sum-squared YOLOv1 loss; see the module docstring.

    Args:
        num_classes: C. grid: S. num_boxes: B. coord_weight: λ_coord (5). noobj_weight: λ_noobj (0.5).
        class_cells: ``center`` (the paper: the cell holding each GT's centre) or ``covered`` (every cell whose
            centre a GT box contains; see the module docstring).
        class_softmax: class values are logits of a softmax trained by cross-entropy (YOLOv2's region layer)
            instead of the paper's probabilities regressed by squared error.
    """

    def __init__(self, num_classes: int, grid: int = 7, num_boxes: int = 2, coord_weight: float = 5.0,
                 noobj_weight: float = 0.5, class_cells: str = "center", class_softmax: bool = False) -> None:
        super().__init__()
        if class_cells not in CLASS_CELLS:
            raise ValueError(f"unknown class_cells {class_cells!r}; expected one of {', '.join(CLASS_CELLS)}")
        self.class_cells, self.class_softmax = class_cells, class_softmax
        self.num_classes, self.num_boxes = num_classes, num_boxes
        self.coder = CellCoder(grid)
        self.coord_weight, self.noobj_weight = coord_weight, noobj_weight

    def class_loss(self, values: Tensor, labels: Tensor) -> Tensor:
        """Summed over (M, C) class values of the cells that train and their (M,) labels: the paper's squared
        error against one-hot targets, or with ``class_softmax`` cross-entropy on their softmax."""
        if self.class_softmax:
            return F.cross_entropy(values.float(), labels, reduction="sum")
        return ((values - F.one_hot(labels, self.num_classes).to(values.dtype)) ** 2).sum()

    def decode_cells(self, boxes: Tensor, cells: Tensor, size: Sequence[int]) -> Tensor:
        """(..., B, 5) raw (x, y, √w, √h, conf) of the cells ``cells`` (..., 2) (x, y) → (..., B, 4) xyxy pixels
        (a negative √ counts as 0)."""
        t = torch.cat([boxes[..., :2], boxes[..., 2:4].clamp(min=0)], dim=-1)
        flat_cells = cells[..., None, :].expand(*t.shape[:-1], 2).reshape(-1, 2)
        return self.coder.decode(t.reshape(-1, 4), flat_cells, tuple(size)).view(*t.shape[:-1], 4)

    def forward(self, output: Tensor, targets: Sequence[dict], size: Sequence[int]) -> dict[str, Tensor]:
        """
        Args:
            output: (N, S, S, 5B + C) raw predictions: per box (x, y, √w, √h, conf), then C class values;
                indexed [image, cell row, cell column].
            targets: per image, ``boxes`` (K, 4) xyxy pixels and ``labels`` (K,) 0-based.
            size: (height, width) of the input.
        """
        n, s = output.shape[:2]
        device = output.device
        boxes = output[..., : 5 * self.num_boxes].reshape(n, s, s, self.num_boxes, 5)
        gt = torch.cat([t["boxes"].to(device, torch.float32) for t in targets])
        labels = torch.cat([t["labels"].to(device) for t in targets])
        image = torch.cat([torch.full((len(t["boxes"]),), i, device=device, dtype=torch.long)
                           for i, t in enumerate(targets)])
        noobj = torch.ones(boxes.shape[:-1], dtype=torch.bool, device=device)
        zero = output.sum() * 0.0
        loss_box, loss_obj, loss_cls = zero, zero, zero
        class_map = None
        if self.class_cells == "covered":  # (N, S, S) class targets, -1: none; centre cells overwritten below
            class_map = torch.stack([
                torch.where(index >= 0, labels_i[index.clamp(min=0)], -1) if len(labels_i) else index
                for t in targets
                for labels_i, index in [(t["labels"].to(device), covered_cells(t["boxes"].to(device, torch.float32),
                                                                                s, size))]])
        if len(gt):
            cells, encoded = self.coder.encode(gt, tuple(size))
            keep = _one_per_cell((image * s + cells[:, 1]) * s + cells[:, 0])
            gt, labels, image, cells, encoded = gt[keep], labels[keep], image[keep], cells[keep], encoded[keep]
            cell_boxes = boxes[image, cells[:, 1], cells[:, 0]]
            with torch.no_grad():
                resp, iou = responsible_predictor(self.decode_cells(cell_boxes, cells, size), gt)
            chosen = cell_boxes[torch.arange(len(gt), device=device), resp]
            loss_box = ((chosen[:, :4] - encoded) ** 2).sum()
            loss_obj = ((chosen[:, 4] - iou) ** 2).sum()
            noobj[image, cells[:, 1], cells[:, 0], resp] = False
            if class_map is None:
                loss_cls = self.class_loss(output[image, cells[:, 1], cells[:, 0], 5 * self.num_boxes :], labels)
            else:
                class_map[image, cells[:, 1], cells[:, 0]] = labels
        if class_map is not None and (class_map >= 0).any():
            loss_cls = self.class_loss(output[..., 5 * self.num_boxes :][class_map >= 0], class_map[class_map >= 0])
        loss_noobj = (boxes[..., 4][noobj] ** 2).sum()
        return {
            "loss_box": self.coord_weight * loss_box / n,
            "loss_obj": loss_obj / n,
            "loss_noobj": self.noobj_weight * loss_noobj / n,
            "loss_cls": loss_cls / n,
        }
