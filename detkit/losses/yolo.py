"""YOLOv3-family loss: anchor assignment by shape, IoU-family box loss, BCE objectness and classes (or
YOLOv2's softmax cross-entropy classes, or YOLO9000's WordTree classes with joint classification training)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.boxes import elementwise_iou, pairwise_iou
from detkit.losses.box import box_loss
from detkit.losses.focal import sigmoid_focal_loss
from detkit.wordtree import WordTree

IOU_KINDS = ("iou", "giou", "diou", "ciou")


def match_anchors(gt_wh: Tensor, anchors: Tensor, ratio_thresh: float) -> Tensor:
    """Which anchors are responsible for which ground truths, by shape alone.

    Args:
        gt_wh: (M, 2) ground-truth widths and heights in pixels.
        anchors: (L, A, 2) anchor widths and heights in pixels, per level.
        ratio_thresh: an anchor matches when neither side differs from the GT's by more than this factor.

    Returns:
        (M, L, A) bool. Every GT also keeps its single best anchor (highest shape IoU over all levels), so
        no object is left without a predictor, however unusual its shape.
    """
    flat = anchors.reshape(-1, 2)
    ratio = gt_wh[:, None, :] / flat[None]
    worst = torch.maximum(ratio, 1.0 / ratio).amax(dim=2)
    match = worst < ratio_thresh
    inter = torch.minimum(gt_wh[:, None, :], flat[None]).prod(dim=2)
    shape_iou = inter / (gt_wh.prod(dim=1)[:, None] + flat.prod(dim=1)[None] - inter)
    if len(gt_wh):
        match[torch.arange(len(gt_wh)), shape_iou.argmax(dim=1)] = True
    return match.view(len(gt_wh), *anchors.shape[:2])


class YOLOLoss(nn.Module):
    """Loss over raw head outputs of every level.

    ``λ_box · L_box + λ_obj · Σ_l w_l · L_obj,l + λ_cls · L_cls``: the box term is an IoU-family loss between
    decoded predictions and their ground truths; objectness is BCE over every prediction with target the
    same IoU-family value of (pred, GT), detached and clipped at 0, at responsible predictions and 0 elsewhere
    (as YOLOv4/v5 do), so the score ranks localisation
    quality; classes are independent BCE (YOLOv3) on responsible predictions. All terms are means, so the
    loss does not grow with the batch or the image size.

    With ``neighbor_cells`` a GT is also assigned to the two adjacent cells nearest its centre (left or right,
    above or below), tripling the positives; the decoder's offset range must reach them (``xy_scale`` ≥ 2).

    ``box_loss`` picks the IoU-family box term (``iou`` is −ln IoU; the others 1 − GIoU/DIoU/CIoU). ``focal``
    replaces both BCE terms by the sigmoid focal loss (``focal_gamma``, ``focal_alpha``; same means and sums),
    which down-weights the many easy empty cells. ``label_smoothing`` ε turns the class targets 1 / 0 into
    1 − ε/2 and ε/2 (YOLOv4's class label smoothing; 0: off). With ``ignore_thresh`` (YOLOv2/v3: 0.6/0.5), a
    prediction that is not responsible for a GT but overlaps one by IoU > ``ignore_thresh`` is left out of the
    objectness term instead of being pushed to 0: it is a good box, merely not the assigned one. With
    ``class_softmax`` (YOLOv2's [region] layer) the class term is softmax cross-entropy on responsible
    predictions, a mean over them (label smoothing ε spread as :func:`torch.nn.functional.cross_entropy` does;
    ``focal`` then applies to objectness only). With ``wordtree`` (YOLO9000) it is the tree cross-entropy
    (:meth:`detkit.wordtree.WordTree.loss`: one softmax cross-entropy per sibling set on the label's path).

    Joint training (YOLO9000), as darknet's region layer does it: a target with ``image_label`` (a class index)
    and no boxes is a classification image. It adds no box term. Its class loss is taken at the single
    prediction, over every anchor, cell and level of the image, with the highest objectness × class probability
    for ``image_label`` (the path product with ``wordtree``, the softmax or sigmoid probability otherwise), and
    counts as one more positive. With ``class_only_objectness`` (YOLO9000 assumes the chosen box overlaps the
    unknown ground truth by IoU ≥ 0.3: 0.3 here) every other prediction of the image has objectness target 0 and
    the chosen one is raised towards the value while below it (a hinge: no term above it); None leaves
    objectness out for classification images. Without objectness in the choice and the other predictions held
    at 0, a prediction once chosen is chosen again whatever the image holds (measured: the detector collapses).
    Its class term weighs as one detection object's: darknet gives a box one responsible prediction, this loss
    several (matched anchors, ``neighbor_cells``), so the term is multiplied by the batch's positives per box.
    The detection images' objectness term is their own mean, as without classification images in the batch, and
    the classification images' is added at their share of the batch (:meth:`_joint_objectness`).
    """

    def __init__(
        self,
        num_classes: int,
        box_loss: str = "ciou",
        box_weight: float = 0.05,
        obj_weight: float = 1.0,
        cls_weight: float = 0.5,
        level_weights: Sequence[float] = (4.0, 1.0, 0.4),
        ratio_thresh: float = 4.0,
        neighbor_cells: bool = False,
        focal: bool = False,
        focal_gamma: float = 1.5,
        focal_alpha: float | None = 0.25,
        label_smoothing: float = 0.0,
        ignore_thresh: float | None = None,
        class_softmax: bool = False,
        wordtree: WordTree | None = None,
        class_only_objectness: float | None = 0.3,
    ) -> None:
        super().__init__()
        if box_loss not in IOU_KINDS:
            raise ValueError(f"unknown box_loss {box_loss!r}; expected one of {', '.join(IOU_KINDS)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.focal, self.focal_gamma, self.focal_alpha = focal, focal_gamma, focal_alpha
        self.label_smoothing = label_smoothing
        self.ignore_thresh = ignore_thresh
        self.class_softmax = class_softmax
        self.wordtree = wordtree
        self.class_only_objectness = class_only_objectness
        self.num_classes = num_classes
        self.box_loss = box_loss
        self.box_weight, self.obj_weight, self.cls_weight = box_weight, obj_weight, cls_weight
        self.level_weights = list(level_weights)
        self.ratio_thresh = ratio_thresh
        self.neighbor_cells = neighbor_cells

    def forward(
        self, outputs: Sequence[Tensor], boxes: Sequence[Tensor], targets: Sequence[dict], anchors: Tensor,
        strides: Sequence[int],
    ) -> dict[str, Tensor]:
        """
        Args:
            outputs: per level, raw head output (B, A, H, W, 5 + C): tx, ty, tw, th, objectness, classes.
            boxes: per level, the decoded predicted boxes (B, A, H, W, 4), xyxy pixels.
            targets: per image, ``boxes`` (N, 4) xyxy pixels of the input tensor and ``labels`` (N,); a
                classification image has ``image_label`` (int) and no boxes.
            anchors: (L, A, 2) pixels. strides: per level.
        """
        device = outputs[0].device
        class_only = classification_images(targets)
        chosen = self.best_class_predictions(outputs, targets, class_only)
        gt = torch.cat([t["boxes"].to(device, torch.float32) for t in targets])
        labels = torch.cat([t["labels"].to(device) for t in targets])
        image_index = torch.cat(
            [torch.full((len(t["boxes"]),), i, device=device, dtype=torch.long) for i, t in enumerate(targets)]
        )
        match = match_anchors((gt[:, 2:] - gt[:, :2]).clamp(min=1.0), anchors, self.ratio_thresh)
        centers = (gt[:, :2] + gt[:, 2:]) / 2

        zero = outputs[0].sum() * 0.0
        loss_box, loss_cls, loss_obj, loss_cls_only = zero, zero, zero, zero
        num_pos, num_class_only = 0, 0
        for level, (out, pred_boxes, stride) in enumerate(zip(outputs, boxes, strides)):
            _, _, h, w, _ = out.shape
            gt_idx, anchor_idx = match[:, level].nonzero(as_tuple=True)
            gt_idx, anchor_idx, gx, gy = self.assign_cells(centers[gt_idx] / stride, gt_idx, anchor_idx, w, h)
            b = image_index[gt_idx]
            obj_target = torch.zeros_like(out[..., 4])
            weight = None
            if class_only:
                weight = torch.ones_like(obj_target)
                if self.class_only_objectness is None:
                    weight[class_only] = 0.0  # no objectness term for classification images
                b_c, a_c, y_c, x_c, label_c = chosen[level]
                if len(b_c):
                    loss_cls_only = loss_cls_only + self._class_loss(out[b_c, a_c, y_c, x_c, 5:], label_c)
                    num_class_only += len(b_c)
                    if self.class_only_objectness is not None:
                        # darknet's hinge: raised while below the assumed IoU, left alone above it
                        low = out[b_c, a_c, y_c, x_c, 4].detach().sigmoid() < self.class_only_objectness
                        weight[b_c, a_c, y_c, x_c] = low.to(weight.dtype)
                        obj_target[b_c, a_c, y_c, x_c] = self.class_only_objectness
            if len(gt_idx):
                pred = pred_boxes[b, anchor_idx, gy, gx]
                target = gt[gt_idx]
                loss_box = loss_box + box_loss(pred, target, self.box_loss, reduction="sum")
                num_pos += len(gt_idx)
                iou = elementwise_iou(pred.detach(), target, self.box_loss).clamp(min=0.0)
                obj_target[b, anchor_idx, gy, gx] = iou.to(obj_target.dtype)
                loss_cls = loss_cls + self._class_loss(out[b, anchor_idx, gy, gx, 5:], labels[gt_idx])
            if self.ignore_thresh is not None:
                kept = self.not_ignored(pred_boxes, gt, image_index, obj_target)
                weight = kept if weight is None else weight * kept
            if weight is None:
                level_obj = self._bce(out[..., 4], obj_target)
            elif class_only:
                level_obj = self._joint_objectness(out[..., 4], obj_target, weight, class_only)
            else:
                level_obj = (self._bce(out[..., 4], obj_target, "none") * weight).sum() / weight.sum().clamp(min=1.0)
            loss_obj = loss_obj + self.level_weights[level] * level_obj
        # a classification image's one prediction counts as one detection object: as many as an object's
        # positives in this batch (anchors x cells matched per box; 1 when the batch has no box)
        per_object = num_pos / len(gt) if len(gt) else 1.0
        loss_cls = loss_cls + per_object * loss_cls_only
        num_cls = max(num_pos + per_object * num_class_only, 1)
        num_pos = max(num_pos, 1)
        per_class = 1 if self.class_softmax or self.wordtree is not None else self.num_classes  # BCE: a class mean
        return {
            "loss_box": self.box_weight * loss_box / num_pos,
            "loss_obj": self.obj_weight * loss_obj,
            "loss_cls": self.cls_weight * loss_cls / (num_cls * per_class),
        }

    def _joint_objectness(self, logits: Tensor, target: Tensor, weight: Tensor, class_only: list[int]) -> Tensor:
        """One level's objectness term of a batch with classification images ``class_only``: the mean over the
        detection images' predictions, as in a batch of detection images alone, plus the mean over the
        classification images' times their share of the batch. A mean over the whole batch would scale the
        detection images' term down by their share (measured: a joint run with 57% classification images
        trained objectness at 0.43× and found nothing in 10 minutes)."""
        per = self._bce(logits, target, "none") * weight
        is_class = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
        is_class[class_only] = True
        detection = per[~is_class].sum() / weight[~is_class].sum().clamp(min=1.0)
        classification = per[is_class].sum() / weight[is_class].sum().clamp(min=1.0)
        return detection + classification * (len(class_only) / len(logits))

    @torch.no_grad()
    def not_ignored(self, pred_boxes: Tensor, gt: Tensor, image_index: Tensor, obj_target: Tensor) -> Tensor:
        """(B, A, H, W) float: 0 where a prediction with objectness target 0 overlaps a GT of its image by IoU
        > ``ignore_thresh``, 1 elsewhere. ``pred_boxes`` (B, A, H, W, 4) and ``gt`` (M, 4) xyxy pixels."""
        keep = torch.ones_like(obj_target)
        for b in range(len(pred_boxes)):
            own = gt[image_index == b]
            if len(own):
                best = pairwise_iou(pred_boxes[b].reshape(-1, 4).float(), own).amax(dim=1).view(keep[b].shape)
                keep[b][(best > self.ignore_thresh) & (obj_target[b] == 0)] = 0.0
        return keep

    @torch.no_grad()
    def best_class_predictions(self, outputs: Sequence[Tensor], targets: Sequence[dict], class_only: list[int]
                               ) -> list[tuple[Tensor, ...]]:
        """Per level, (batch, anchor, y, x, label) index tensors of the predictions chosen for the classification
        images ``class_only`` (indices into ``targets``): each image's single prediction, over all levels, with
        the highest objectness × class probability (:meth:`class_log_prob`) for its ``image_label``, as darknet's
        region layer chooses."""
        device = outputs[0].device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if not class_only:
            return [(empty,) * 5 for _ in outputs]
        images = torch.tensor(class_only, device=device)
        labels = torch.tensor([int(targets[i]["image_label"]) for i in class_only], device=device)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"image_label must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        best = []
        for out in outputs:
            logp = self.class_log_prob(out[images, ..., 5:].detach())  # (K, A, H, W, C)
            index = labels.view(-1, 1, 1, 1, 1).expand(*logp.shape[:-1], 1)
            score = logp.gather(-1, index).squeeze(-1) + F.logsigmoid(out[images, ..., 4].detach())
            best.append(score.flatten(1).max(dim=1))
        level = torch.stack([v for v, _ in best]).argmax(dim=0)
        chosen = []
        for lvl, out in enumerate(outputs):
            _, a, h, w, _ = out.shape
            here = level == lvl
            flat = best[lvl][1][here]
            chosen.append((images[here], flat // (h * w), flat % (h * w) // w, flat % w, labels[here]))
        return chosen

    def class_log_prob(self, logits: Tensor) -> Tensor:
        """(..., C) class logits → (..., C) log-probability of each class as this loss reads them: the WordTree
        path product, the softmax, or independent sigmoids."""
        if self.wordtree is not None:
            return self.wordtree.log_absolute(logits)
        if self.class_softmax:
            return logits.log_softmax(dim=-1)
        return F.logsigmoid(logits)

    def _class_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed class loss of responsible predictions: ``logits`` (P, C), ``labels`` (P,) 0-based."""
        if self.wordtree is not None:
            return self.wordtree.loss(logits, labels)
        if self.class_softmax:
            return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)
        target = F.one_hot(labels, self.num_classes).to(logits.dtype)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        return self._bce(logits, target, reduction="sum")

    def _bce(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if self.focal:
            return sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction=reduction)
        return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)

    def assign_cells(self, grid_xy: Tensor, gt_idx: Tensor, anchor_idx: Tensor, w: int, h: int):
        """Cells responsible for each (GT, anchor) pair: the one holding the centre (``grid_xy``, in cell
        units), plus with ``neighbor_cells`` the horizontally and vertically adjacent cells nearest to it."""
        cell = grid_xy.long()
        gx, gy = cell[:, 0].clamp(0, w - 1), cell[:, 1].clamp(0, h - 1)
        if not self.neighbor_cells:
            return gt_idx, anchor_idx, gx, gy
        frac = grid_xy - cell
        dx = torch.where(frac[:, 0] < 0.5, -1, 1)
        dy = torch.where(frac[:, 1] < 0.5, -1, 1)
        nx, ny = gx + dx, gy + dy
        ok_x, ok_y = (nx >= 0) & (nx < w), (ny >= 0) & (ny < h)
        return (
            torch.cat([gt_idx, gt_idx[ok_x], gt_idx[ok_y]]),
            torch.cat([anchor_idx, anchor_idx[ok_x], anchor_idx[ok_y]]),
            torch.cat([gx, nx[ok_x], gx[ok_y]]),
            torch.cat([gy, gy[ok_x], ny[ok_y]]),
        )


def classification_images(targets: Sequence[dict]) -> list[int]:
    """Indices of the classification images of ``targets`` (those with ``image_label``); one that also has
    boxes is a ValueError: an image is either a detection image or a classification image."""
    found = [i for i, t in enumerate(targets) if t.get("image_label") is not None]
    for i in found:
        if len(targets[i]["boxes"]):
            raise ValueError(f"target {i} has an image_label and {len(targets[i]['boxes'])} boxes: a classification "
                             "image (image_label) must have no boxes")
    return found
