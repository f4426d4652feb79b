"""G-CNN (Najibi, Rastegari & Davis, CVPR 2016): object detection without proposals, by iterative regression
of a fixed multi-scale grid of boxes towards the objects.

The global part (the backbone) runs once per image; the regression part (RoI pooling + the Fast R-CNN head
:class:`~detkit.models.roi_heads.RoIBoxHead`, the same weights at every step) runs once per step on the
current boxes B_s, starting from the grid B_1 (:func:`~detkit.anchors.gcnn_grid`, 165 boxes by default).

Training: each grid box is assigned once, to the ground truth G of highest IoU if that IoU exceeds
``assign_iou`` (0.2), else to the background; its classification target is G's class (or background) at
every step. Step s = 1..S_train regresses B_s towards Φ(B_s, G, s) = B_s + (G − B_s) / (S_train − s + 1),
encoded relative to B_s, so the last step's target is G itself; B_{s+1} is the box the network predicted
(detached), decoded with the ground-truth class's regressor (the predicted class's for background boxes).
The losses of the steps are summed. Test: S_test steps, each moving a box with the regressor of its most
confident object class; the last step's class scores and boxes go through class-aware NMS.

``test_keep`` (not in the paper) bounds the test cost: after the first step only each image's ``test_keep`` boxes of
highest object probability take the remaining steps; the grid's boxes far from every object (most of them)
stop there, as background.

S_train = S_test = 1 is "the same grid, one regression step" (``model.train_steps=1 model.test_steps=1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detkit.anchors import gcnn_grid
from detkit.boxes import DeltaCoder
from detkit.models.detectors.common import check_targets, plain, stack_images
from detkit.models.detectors.fast_rcnn import RoIDetector
from detkit.models.roi_heads import FAST_RCNN_WEIGHTS, class_deltas, roi_head_loss
from detkit.postprocess import postprocess_detections

__all__ = ["GCNN", "step_target", "assign_grid", "ASSIGN"]

ASSIGN = ("initial", "per_step")


def step_target(boxes: Tensor, gt: Tensor, step: int, train_steps: int) -> Tensor:
    """Φ(B_s, G, s) = B_s + (G − B_s) / (S_train − s + 1) for 1 ≤ s ≤ S_train: (N, 4) xyxy; equals G at
    s = S_train."""
    if not 1 <= step <= train_steps:
        raise ValueError(f"step must be in 1..{train_steps}, got {step}")
    return boxes + (gt - boxes) / (train_steps - step + 1)


def assign_grid(grid: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int,
                assign_iou: float = 0.2) -> tuple[Tensor, Tensor]:
    """Each of the (N, 4) ``grid`` boxes → (labels (N,) in 0..K, K = background; matched GT boxes (N, 4), the
    box itself for background): the GT of highest IoU if that IoU is > ``assign_iou``."""
    labels = torch.full((len(grid),), num_classes, dtype=torch.long, device=grid.device)
    matched = grid.clone()
    if len(gt_boxes):
        best, idx = box_iou(gt_boxes.to(grid), grid).max(dim=0)
        fg = best > assign_iou
        labels[fg] = gt_labels.to(grid.device).long()[idx[fg]]
        matched[fg] = gt_boxes.to(grid)[idx[fg]]
    return labels, matched


def _valid(boxes: Tensor, size: Sequence[int], min_size: float = 1.0) -> Tensor:
    """Boxes clipped to ``size`` = (H, W) and widened to at least ``min_size`` so they can be encoded."""
    h, w = size
    x1, y1 = boxes[:, 0].clamp(0, w - min_size), boxes[:, 1].clamp(0, h - min_size)
    x2 = torch.max(boxes[:, 2].clamp(max=w), x1 + min_size)
    y2 = torch.max(boxes[:, 3].clamp(max=h), y1 + min_size)
    return torch.stack([x1, y1, x2, y2], dim=1)


class GCNN(RoIDetector):
    """G-CNN with the common detkit interface (see the module docstring; losses ``loss_cls``, ``loss_box``
    summed over the steps).

    Args:
        train_steps, test_steps: S_train and S_test (3 and 5 in the paper).
        grid_scales, grid_overlap, grid_ratios: :func:`~detkit.anchors.gcnn_grid`'s ``scales``, ``overlap`` and
            ``ratios`` (h / w; (1,) or None: the paper's squares), the grid being built at the input size.
        assign_iou: a grid box learns an object when their IoU is above this (0.2).
        boxes_per_image: None trains every grid box; a number draws that many per image (up to a quarter
            foreground) before the steps, to bound the cost of a large grid.
        test_keep: None regresses every grid box through the S_test steps; a number keeps, after the first,
            that many boxes per image (the highest object probability) for the other steps.
        assign: ``initial`` (the paper's) keeps each box's ground truth and class of the grid for every step;
            ``per_step`` assigns each step's boxes anew by their IoU (Cascade R-CNN's way), so that a box the
            regressor moved onto an object, or off it, is trained as what it now covers.
        The other arguments: see :class:`~detkit.models.detectors.fast_rcnn.RoIDetector`.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, train_steps: int = 3, test_steps: int = 5,
                 grid_scales: Sequence[float] = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5), grid_overlap: float = 0.5,
                 grid_ratios: Sequence[float] | None = (1.0,), assign_iou: float = 0.2,
                 boxes_per_image: int | None = None, test_keep: int | None = None, assign: str = "initial",
                 **head_args) -> None:
        super().__init__(num_classes, backbone, **head_args)
        if train_steps < 1 or test_steps < 1:
            raise ValueError(f"train_steps and test_steps must be ≥ 1, got {train_steps}, {test_steps}")
        self.train_steps, self.test_steps = train_steps, test_steps
        self.grid_scales, self.grid_overlap = tuple(plain(grid_scales)), grid_overlap
        self.grid_ratios = tuple(plain(grid_ratios)) if grid_ratios is not None else (1.0,)
        gcnn_grid(64, self.grid_scales, grid_overlap, self.grid_ratios)  # a bad scale, overlap or ratio fails here
        if test_keep is not None and test_keep < 1:
            raise ValueError(f"test_keep must be None or ≥ 1, got {test_keep}")
        if assign not in ASSIGN:
            raise ValueError(f"assign must be one of {ASSIGN}, got {assign!r}")
        self.assign_iou, self.boxes_per_image, self.test_keep = assign_iou, boxes_per_image, test_keep
        self.assign = assign
        self.coder = DeltaCoder(FAST_RCNN_WEIGHTS)
        self._grids: dict[tuple, Tensor] = {}

    def grid(self, image_size: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The initial boxes B_1 (N, 4) xyxy for an input of ``image_size`` = (H, W); cached."""
        key = (int(image_size[0]), int(image_size[1]), str(device))
        if key not in self._grids:
            self._grids[key] = gcnn_grid(key[:2], self.grid_scales, self.grid_overlap, self.grid_ratios).to(device)
        return self._grids[key]

    def _subsample(self, labels: Tensor, matched: Tensor, grid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.boxes_per_image is None or len(grid) <= self.boxes_per_image:
            return labels, matched, grid
        fg = torch.nonzero(labels < self.num_classes).squeeze(1)
        bg = torch.nonzero(labels == self.num_classes).squeeze(1)
        fg = fg[torch.randperm(len(fg), device=fg.device)[: self.boxes_per_image // 4]]
        bg = bg[torch.randperm(len(bg), device=bg.device)[: self.boxes_per_image - len(fg)]]
        keep = torch.cat([fg, bg])
        return labels[keep], matched[keep], grid[keep]

    def step(self, class_logits: Tensor, box_deltas: Tensor, boxes: Tensor, size: Sequence[int],
             classes: Tensor | None = None) -> Tensor:
        """B_{s+1} (R, 4): ``boxes`` (R, 4) moved by the regressor of ``classes`` (R,) (default: each box's most
        confident object class), clipped to ``size`` = (H, W); no gradient."""
        with torch.no_grad():
            if classes is None:
                classes = class_logits[:, : self.num_classes].argmax(dim=1)
            deltas = class_deltas(box_deltas.float(), classes)
            return _valid(self.coder.decode(deltas, boxes), size)

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x = stack_images(images)
        size = tuple(x.shape[-2:])
        sizes = [size] * len(x)
        features = self.features(x)  # the global part: once per batch, whatever the number of steps
        grid = self.grid(size, x.device)
        if not self.training:
            return self._detect(features, grid, sizes)
        targets = check_targets(targets, len(x))
        assigned = [self._subsample(*assign_grid(grid, t["boxes"], t["labels"], self.num_classes, self.assign_iou),
                                    grid) for t in targets]
        labels = torch.cat([a[0] for a in assigned])
        gt = torch.cat([a[1] for a in assigned])
        counts = [len(a[2]) for a in assigned]
        boxes = torch.cat([a[2] for a in assigned])
        fg = labels < self.num_classes
        losses = {"loss_cls": x.new_zeros(()), "loss_box": x.new_zeros(())}
        for s in range(1, self.train_steps + 1):
            if s > 1 and self.assign == "per_step":
                labels, gt = (torch.cat(parts) for parts in zip(*(
                    assign_grid(b, t["boxes"], t["labels"], self.num_classes, self.assign_iou)
                    for b, t in zip(boxes.split(counts), targets))))
                fg = labels < self.num_classes
            class_logits, box_deltas = self.head(features, list(boxes.split(counts)), sizes)
            regression = torch.zeros_like(boxes)
            regression[fg] = self.coder.encode(step_target(boxes[fg], gt[fg], s, self.train_steps), boxes[fg])
            for name, value in roi_head_loss(class_logits, box_deltas, labels, regression).items():
                losses[name] = losses[name] + value
            if s < self.train_steps:
                chosen = class_logits[:, : self.num_classes].argmax(dim=1)
                chosen = torch.where(fg, labels, chosen)
                boxes = self.step(class_logits, box_deltas, boxes, size, chosen)
        return losses

    @torch.no_grad()
    def _detect(self, features: Tensor, grid: Tensor, sizes: list[tuple[int, int]]) -> list[dict]:
        batch, count = len(sizes), len(grid)
        boxes = grid.repeat(batch, 1)
        for s in range(self.test_steps):
            class_logits, box_deltas = self.head_in_chunks(features, list(boxes.split(count)), sizes)
            boxes = self.step(class_logits, box_deltas, boxes, sizes[0])
            if s == 0 and self.test_keep is not None and self.test_keep < count and self.test_steps > 1:
                objectness = class_logits.float().softmax(dim=1)[:, : self.num_classes].amax(dim=1)
                top = objectness.view(batch, count).topk(self.test_keep, dim=1).indices
                keep = (top + torch.arange(batch, device=top.device)[:, None] * count).flatten()
                boxes, count = boxes[keep], self.test_keep
        scores = class_logits.float().softmax(dim=1)[:, : self.num_classes]
        return postprocess_detections(boxes.view(batch, -1, 4), scores.view(batch, count, -1),
                                      self.score_thresh, self.nms_thresh, self.max_det, image_size=sizes[0])
