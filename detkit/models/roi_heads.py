"""The Fast R-CNN RoI box head (Girshick, ICCV 2015), shared by Fast R-CNN, G-CNN and FPN R-CNN.

Region features are pooled from backbone maps computed once per image (``roi_pool`` as in the paper,
``roi_align`` as an option), go through two fully connected layers, and end in a softmax over K + 1 classes
and K class-specific box regressors. Labels: 0..K−1 are the object classes, K is the background (so detkit's
0-based class labels pass through unchanged). Deltas are :class:`~detkit.boxes.DeltaCoder` offsets with the
Fast R-CNN weights (10, 10, 5, 5). Boxes are xyxy in absolute pixels of the network input.

FPN uses ``torchvision.ops.MultiScaleRoIAlign`` as the pooler: its forward(features, boxes, image_shapes) has
the call shape of :class:`SingleLevelPooler`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align, roi_pool

from detkit.boxes import DeltaCoder
from detkit.postprocess import postprocess_detections

__all__ = ["FAST_RCNN_WEIGHTS", "POOLERS", "SingleLevelPooler", "RoIBoxHead", "sample_rois", "roi_head_loss",
           "roi_detections"]

FAST_RCNN_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
POOLERS = ("roi_pool", "roi_align")


def _fast_rcnn_coder() -> DeltaCoder:
    return DeltaCoder(FAST_RCNN_WEIGHTS)


class SingleLevelPooler(nn.Module):
    """RoI pooling on one feature map: (B, C, H, W) and per-image RoIs → (R, C, P, P), R = Σ RoIs, in order.

    Args:
        kind: ``roi_pool`` (max pooling over quantised bins, Fast R-CNN) or ``roi_align`` (bilinear sampling,
            Mask R-CNN; ``aligned`` half-pixel offset as detectron2's ROIAlignV2).
        output_size: P.
        spatial_scale: map pixels per input pixel, 1 / stride (1/16 for VGG16's conv5_3).
        sampling_ratio: bilinear samples per bin side (``roi_align`` only).
        aligned: ``roi_align``'s pixel-centre correction.
        feature: key of the map to pool when ``features`` is a dict (None: the dict's only map).
    """

    def __init__(self, kind: str = "roi_pool", output_size: int = 7, spatial_scale: float = 1 / 16,
                 sampling_ratio: int = 2, aligned: bool = True, feature: str | None = None) -> None:
        super().__init__()
        if kind not in POOLERS:
            raise ValueError(f"unknown RoI pooler {kind!r}; expected one of {', '.join(POOLERS)}")
        self.kind, self.output_size, self.spatial_scale = kind, int(output_size), float(spatial_scale)
        self.sampling_ratio, self.aligned, self.feature = int(sampling_ratio), aligned, feature

    def feature_map(self, features: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The map to pool: ``features`` itself, or its ``feature`` entry (the only one when None)."""
        if isinstance(features, Tensor):
            return features
        if self.feature is not None:
            if self.feature not in features:
                raise KeyError(f"feature map {self.feature!r} not among {sorted(features)}")
            return features[self.feature]
        if len(features) != 1:
            raise ValueError(f"SingleLevelPooler got {len(features)} maps ({sorted(features)}); name one with "
                             "feature=...")
        return next(iter(features.values()))

    def forward(self, features: Tensor | Mapping[str, Tensor], rois: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """``features`` (B, C, H, W) (or a dict holding it), ``rois`` B tensors (N_i, 4) xyxy input pixels →
        (Σ N_i, C, P, P). ``image_sizes`` is unused (one map has one scale); it keeps FPN's call shape."""
        x = self.feature_map(features)
        if len(rois) != x.shape[0]:
            raise ValueError(f"got RoIs for {len(rois)} images but features for {x.shape[0]}")
        rois = [r.to(x.dtype) for r in rois]
        if self.kind == "roi_pool":
            return roi_pool(x, rois, self.output_size, self.spatial_scale)
        return roi_align(x, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


class RoIBoxHead(nn.Module):
    """pooler → flatten → fc(representation) → ReLU → fc(representation) → ReLU → cls_score (K + 1) and
    bbox_pred (4K, class-specific), Fast R-CNN's fc6, fc7, fc8 and bbox regressor.

    Args:
        pooler: module mapping (features, rois, image_sizes) → (R, in_channels, pool_size, pool_size).
        in_channels, pool_size: the pooled features' C and P.
        num_classes: K object classes.
        representation: width of fc6 and fc7 (4096 in the paper's VGG16; 1024 in FPN).
        dropout: after each fc's ReLU (the paper's VGG16 keeps its 0.5).
        background_box: also give the background class a (never trained, never used) regressor, as
            torchvision's and Detectron's heads do: 4(K + 1) outputs, the last four dropped in ``predict``. Only
            for parameter parity with those implementations (and their checkpoints' shapes).
        background_logits: ``cls_score`` rows that all mean background (K + B outputs), merged into one logit
            by log-sum-exp in ``predict``: the softmax over K + 1 then equals the softmax over K + B. 1 is the
            plain head; torchvision's COCO models have 11 (background and the 10 ids COCO leaves unused).
    """

    def __init__(self, pooler: nn.Module, in_channels: int, pool_size: int, num_classes: int,
                 representation: int = 1024, dropout: float = 0.0, background_box: bool = False,
                 background_logits: int = 1) -> None:
        super().__init__()
        if background_logits < 1:
            raise ValueError(f"background_logits must be at least 1, got {background_logits}")
        self.pooler, self.num_classes = pooler, num_classes
        self.fc6 = nn.Linear(in_channels * pool_size * pool_size, representation)
        self.fc7 = nn.Linear(representation, representation)
        self.dropout = nn.Dropout(dropout)
        self.cls_score = nn.Linear(representation, num_classes + background_logits)
        self.bbox_pred = nn.Linear(representation, 4 * (num_classes + int(background_box)))
        # The paper's initialisation: small Gaussians, so that early deltas stay near zero.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled (R, C, P, P) → class logits (R, K + 1), box deltas (R, 4K)."""
        x = self.dropout(F.relu(self.fc6(pooled.flatten(1))))
        x = self.dropout(F.relu(self.fc7(x)))
        logits = self.cls_score(x)
        if logits.shape[1] > self.num_classes + 1:
            k = self.num_classes
            logits = torch.cat([logits[:, :k], logits[:, k:].logsumexp(dim=1, keepdim=True)], dim=1)
        return logits, self.bbox_pred(x)[:, : 4 * self.num_classes]

    def forward(self, features, rois: Sequence[Tensor], image_sizes) -> tuple[Tensor, Tensor]:
        """RoIs: one (N_i, 4) xyxy tensor per image → class logits (R, K + 1), box deltas (R, 4K), R = Σ N_i."""
        return self.predict(self.pooler(features, rois, image_sizes))


def _sample(candidates: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    order = torch.randperm(len(candidates), generator=generator)
    return candidates[order[:count].to(candidates.device)]


def sample_rois(rois: Sequence[Tensor], targets: Sequence[Mapping], batch_per_image: int = 128,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou: tuple[float, float] = (0.1, 0.5),
                append_gt: bool = True, coder: DeltaCoder | None = None, *, num_classes: int,
                generator: torch.Generator | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
    """Fast R-CNN's RoI mini-batch: per image, up to ``fg_fraction`` · ``batch_per_image`` foreground RoIs
    (IoU ≥ ``fg_iou`` with a ground truth) and background RoIs (IoU in [``bg_iou[0]``, ``bg_iou[1]``)) for the
    rest, each drawn at random without replacement. An image with no RoI in the background range (no objects,
    say) takes its background from all RoIs below ``bg_iou[1]``, so it still trains the background class.

    Args:
        rois: per image (N_i, 4) xyxy input pixels (proposals; read without gradient).
        targets: per image ``boxes`` (G_i, 4) xyxy and ``labels`` (G_i,) 0-based.
        append_gt: add the ground-truth boxes to the candidates (so each object has a foreground RoI).
        coder: encodes the regression targets; default Fast R-CNN's weights (10, 10, 5, 5).
        num_classes: K, the background label (required, keyword only).
        generator: for the random draw.

    Returns:
        sampled RoIs per image (S_i, 4), labels (Σ S_i,) long in 0..K (K = background), regression targets
        (Σ S_i, 4): the deltas from each RoI to its ground truth (zeros for background).
    """
    if not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
    if not bg_iou[0] <= bg_iou[1] <= fg_iou:
        raise ValueError(f"need bg_iou[0] <= bg_iou[1] <= fg_iou, got bg_iou={tuple(bg_iou)}, fg_iou={fg_iou}")
    if len(rois) != len(targets):
        raise ValueError(f"got RoIs for {len(rois)} images and targets for {len(targets)}")
    coder = coder or _fast_rcnn_coder()
    sampled, labels, regression = [], [], []
    for boxes, target in zip(rois, targets):
        gt, gt_labels = target["boxes"].to(boxes), target["labels"].to(boxes.device).long()
        candidates = torch.cat([boxes.detach(), gt]) if append_gt else boxes.detach()
        if len(gt):
            best_iou, match = box_iou(gt, candidates).max(dim=0)
        else:
            best_iou = candidates.new_zeros(len(candidates))
            match = torch.zeros(len(candidates), dtype=torch.long, device=boxes.device)
        fg = torch.nonzero(best_iou >= fg_iou).squeeze(1)
        bg = torch.nonzero((best_iou >= bg_iou[0]) & (best_iou < bg_iou[1])).squeeze(1)
        if len(bg) == 0:
            bg = torch.nonzero(best_iou < bg_iou[1]).squeeze(1)
        fg = _sample(fg, min(int(batch_per_image * fg_fraction), len(fg)), generator)
        bg = _sample(bg, min(batch_per_image - len(fg), len(bg)), generator)
        keep = torch.cat([fg, bg])
        chosen = candidates[keep]
        image_labels = torch.full((len(keep),), num_classes, dtype=torch.long, device=boxes.device)
        deltas = chosen.new_zeros((len(keep), 4))
        if len(fg):
            image_labels[: len(fg)] = gt_labels[match[fg]]
            deltas[: len(fg)] = coder.encode(gt[match[fg]], chosen[: len(fg)])
        sampled.append(chosen)
        labels.append(image_labels)
        regression.append(deltas)
    return sampled, torch.cat(labels), torch.cat(regression)


def class_deltas(box_deltas: Tensor, classes: Tensor) -> Tensor:
    """The (R, 4) deltas of class ``classes[r]`` (0..K−1) from class-specific ``box_deltas`` (R, 4K)."""
    per_class = box_deltas.view(len(box_deltas), -1, 4)
    return per_class[torch.arange(len(box_deltas), device=box_deltas.device), classes]


def roi_head_loss(class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression_targets: Tensor,
                  beta: float = 1.0) -> dict[str, Tensor]:
    """Fast R-CNN's multi-task loss.

    Args:
        class_logits: (R, K + 1). box_deltas: (R, 4K), class-specific. labels: (R,) in 0..K (K = background).
        regression_targets: (R, 4) encoded deltas (read for foreground RoIs only).
        beta: smooth-L1 transition point (1 in the paper).

    Returns:
        ``loss_cls``: mean cross-entropy over the R RoIs; ``loss_box``: smooth-L1 between the ground-truth
        class's deltas and the targets, summed over foreground RoIs and divided by R (the paper's
        normalisation by the mini-batch size, so background RoIs dilute it as in Fast R-CNN).
    """
    num_rois, num_logits = class_logits.shape
    if box_deltas.shape != (num_rois, 4 * (num_logits - 1)):
        raise ValueError(f"box_deltas must be (R, 4K) = ({num_rois}, {4 * (num_logits - 1)}) for class_logits "
                         f"{tuple(class_logits.shape)}, got {tuple(box_deltas.shape)}")
    if num_rois == 0:
        zero = class_logits.sum() + box_deltas.sum()
        return {"loss_cls": zero, "loss_box": zero}
    labels = labels.long()
    loss_cls = F.cross_entropy(class_logits.float(), labels)
    fg = torch.nonzero(labels < num_logits - 1).squeeze(1)
    predicted = class_deltas(box_deltas[fg].float(), labels[fg])
    loss_box = F.smooth_l1_loss(predicted, regression_targets[fg].float(), beta=beta, reduction="sum") / num_rois
    return {"loss_cls": loss_cls, "loss_box": loss_box}


@torch.no_grad()
def roi_detections(class_logits: Tensor, box_deltas: Tensor, rois: Sequence[Tensor],
                   image_sizes: Sequence[tuple[int, int]], score_threshold: float = 0.05, nms_threshold: float = 0.5,
                   max_detections: int = 100, coder: DeltaCoder | None = None, method: str = "nms",
                   pre_nms_topk: int | None = 1000, min_size: float = 0.0) -> list[dict[str, Tensor]]:
    """Detections from the head's outputs: softmax, each class's box decoded by its own regressor, then per
    image :func:`~detkit.postprocess.postprocess_detections` (class-aware NMS, boxes clipped to the image).

    Args:
        class_logits: (R, K + 1); box_deltas: (R, 4K); rois: per image (N_i, 4) xyxy, Σ N_i = R.
        image_sizes: per image (height, width).
        pre_nms_topk, min_size: see :func:`~detkit.postprocess.postprocess_detections` (None and 0.01 are
            torchvision's).

    Returns:
        per image ``boxes`` (D, 4) xyxy pixels, ``scores`` (D,), ``labels`` (D,) 0-based (never background).
    """
    coder = coder or _fast_rcnn_coder()
    num_classes = class_logits.shape[1] - 1
    counts = [len(r) for r in rois]
    if sum(counts) != len(class_logits):
        raise ValueError(f"{len(class_logits)} predictions for {sum(counts)} RoIs")
    scores = class_logits.float().softmax(dim=1)[:, :num_classes]
    boxes = torch.cat(list(rois)).float().repeat_interleave(num_classes, dim=0)
    decoded = coder.decode(box_deltas.float().reshape(-1, 4), boxes).view(-1, num_classes, 4)
    results = []
    for image_boxes, image_scores, size in zip(decoded.split(counts), scores.split(counts), image_sizes):
        results += postprocess_detections(image_boxes[None], image_scores[None], score_threshold, nms_threshold,
                                          max_detections, method, pre_nms_topk, image_size=tuple(size),
                                          min_size=min_size)
    return results
