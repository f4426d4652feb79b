"""Fast R-CNN (Girshick, ICCV 2015): the backbone runs once per image, each region proposal is RoI-pooled from
its feature map and classified (softmax over K + 1) and refined (class-specific box regression) by
:class:`~detkit.models.roi_heads.RoIBoxHead`.

Proposals come, in this order of precedence, from ``model(images, targets, proposals=...)``, from each training
target's ``proposals`` entry, or by default from :class:`DenseProposals`, a dense multi-scale sliding grid of the
shared prior generator, so that the detector trains with no external file. External proposals (a COCO-style
json, ``data.proposals_file``) are the dataset's business: :class:`~detkit.data.proposals.WithProposals` maps
them into input pixels with the boxes and puts them in the targets, and the evaluator passes them as
``proposals=``. :class:`RoIDetector` holds what Fast R-CNN shares with G-CNN (:mod:`detkit.models.detectors.gcnn`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.anchors import grid_anchors
from detkit.boxes import clip_boxes
from detkit.models.deformable import DeformableRoIPooler
from detkit.models.detectors.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_targets,
    normalize,
    plain,
    register_normalization,
    stack_images,
)
from detkit.models.necks.fpn import FPN
from detkit.models.roi_heads import RoIBoxHead, SingleLevelPooler, roi_detections, roi_head_loss, sample_rois

__all__ = ["DenseProposals", "RoIDetector", "FastRCNN"]


class DenseProposals:
    """Class-agnostic proposals for any image: :func:`~detkit.anchors.grid_anchors` sliding windows, each
    location holding every size × every ratio h/w, clipped to the image, tiny clipped boxes dropped.

    ``stride`` is one step for every size, or one per size (each size then its own grid: a step of half the
    size keeps small windows as dense, relative to their size, as large ones). ``DenseProposals((12, 24, 48),
    (24, 48, 96), (1, 2))`` gives 32²·2 + 16²·2 + 8²·2 = 2688 boxes on a 384² input, 332 on 128².
    """

    def __init__(self, stride: int | Sequence[int] = 32, sizes: Sequence[float] = (48, 96, 192, 384),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0), min_size: float = 4.0) -> None:
        self.sizes, self.ratios = tuple(plain(sizes)), tuple(plain(ratios))
        stride = plain(stride)
        if isinstance(stride, (int, float)):
            self.strides, self.level_sizes = [int(stride)], [self.sizes]
        elif len(stride) == len(self.sizes):
            self.strides, self.level_sizes = [int(v) for v in stride], [(v,) for v in self.sizes]
        else:
            raise ValueError(f"stride must be one number or one per size: {len(stride)} strides for "
                             f"{len(self.sizes)} sizes")
        self.min_size = min_size
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, image_size: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """(N, 4) xyxy pixel boxes for an image of ``image_size`` = (height, width)."""
        h, w = int(image_size[0]), int(image_size[1])
        key = (h, w, str(device))
        if key not in self._cache:
            cells = [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]
            levels = grid_anchors(cells, self.strides, self.level_sizes, self.ratios)
            boxes = clip_boxes(torch.cat(levels), (h, w))
            wh = boxes[:, 2:] - boxes[:, :2]
            self._cache[key] = boxes[(wh >= self.min_size).all(dim=1)].to(device)
        return self._cache[key]


class RoIDetector(nn.Module):
    """Backbone (its deepest map, computed once per batch) + :class:`RoIBoxHead`, and the common interface's
    input checks and normalisation. ``images`` are 0–1 RGB, (B, 3, H, W) or a list of same-size (3, H, W).

    Args:
        num_classes: K.
        backbone: module returning a list of maps with ``out_channels`` and ``strides``; the last map is pooled.
        fpn_channels: None, or an FPN (:class:`~detkit.models.necks.fpn.FPN`, no extra levels) of this width on
            all the backbone's maps, whose finest level is pooled instead: with a backbone's stride-8 and
            stride-16 maps, a stride-8 map that carries the stride-16 map's context, for objects a few cells wide.
        pooler: ``roi_pool`` (the papers) or ``roi_align``.
        pool_size, sampling_ratio: the pooled grid P×P; ``roi_align``'s samples per bin side.
        deformable_roi: deformable RoI pooling (:class:`~detkit.models.deformable.DeformableRoIPooler`, with
            ``pooler='roi_align'``): each bin moved by an offset predicted from the RoI's pooled features.
        representation, dropout: fc6/fc7 width and dropout.
        score_thresh, nms_thresh, max_det: per-class score threshold, NMS IoU and detections kept per image.
        image_mean, image_std: per RGB channel normalisation of 0–1 images.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, pooler: str = "roi_pool", pool_size: int = 7,
                 sampling_ratio: int = 2, representation: int = 1024, dropout: float = 0.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, max_det: int = 100,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 deformable_roi: bool = False, fpn_channels: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        if fpn_channels is None:
            self.neck = None
            stride, channels = list(backbone.strides)[-1], list(backbone.out_channels)[-1]
        else:
            self.neck = FPN(list(backbone.out_channels), fpn_channels, extra="none", in_strides=backbone.strides,
                            outputs=1)
            stride, channels = self.neck.strides[0], fpn_channels
        roi_pooler = SingleLevelPooler(pooler, pool_size, 1.0 / stride, sampling_ratio)
        if deformable_roi:
            roi_pooler = DeformableRoIPooler(roi_pooler, channels)
        self.head = RoIBoxHead(roi_pooler, channels, pool_size, num_classes, representation, dropout)
        self.score_thresh, self.nms_thresh, self.max_det = score_thresh, nms_thresh, max_det
        register_normalization(self, image_mean, image_std)

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) 0–1 images → the map pooled (B, C, H/stride, W/stride), float32: the backbone's last,
        or the FPN's finest."""
        maps = self.backbone(normalize(images, self.image_mean, self.image_std))
        return (maps[-1] if self.neck is None else self.neck(maps)[0]).float()

    def head_in_chunks(self, features: Tensor, rois: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                       max_rois: int = 4096) -> tuple[Tensor, Tensor]:
        """The head on images grouped so that a call sees at most ``max_rois`` RoIs (at least one image), which
        bounds the pooled features' memory at inference (32 images × 2688 RoIs would be 2 GB); same outputs as
        one call."""
        logits, deltas, start = [], [], 0
        while start < len(rois):
            end, count = start + 1, len(rois[start])
            while end < len(rois) and count + len(rois[end]) <= max_rois:
                count += len(rois[end])
                end += 1
            out = self.head(features[start:end], rois[start:end], sizes[start:end])
            logits.append(out[0])
            deltas.append(out[1])
            start = end
        return torch.cat(logits), torch.cat(deltas)

    def detections(self, class_logits: Tensor, box_deltas: Tensor, rois: Sequence[Tensor],
                   image_size: Sequence[int]) -> list[dict]:
        """Per image ``boxes`` xyxy clipped to ``image_size`` = (H, W), ``scores``, ``labels``."""
        sizes = [tuple(image_size)] * len(rois)
        return roi_detections(class_logits, box_deltas, rois, sizes, self.score_thresh, self.nms_thresh,
                              self.max_det)


class FastRCNN(RoIDetector):
    """Fast R-CNN with the common detkit interface.

    Train mode: ``model(images, targets)`` → ``loss_cls``, ``loss_box``
    (:func:`~detkit.models.roi_heads.roi_head_loss`) on ``batch_per_image`` RoIs per image drawn by
    :func:`~detkit.models.roi_heads.sample_rois` (ground truths appended to the proposals). Eval mode:
    ``model(images)`` → per image ``boxes`` (xyxy pixels), ``scores``, ``labels`` (0-based).

    External proposals, per image (N_i, 4) xyxy pixels of ``images``: ``model(images, targets,
    proposals=[...])`` in either mode, or in train mode a ``proposals`` entry in every target (what
    :class:`~detkit.data.proposals.WithProposals` delivers). Eval mode never reads targets. Without them the
    ``proposals`` generator gives every image the same dense boxes.

    Args:
        proposals: the default proposal generator (:class:`DenseProposals` if None).
        proposals_file: moved to the data config (``data.proposals_file``); accepted as None so that the
            configs stored in older checkpoints still build.
        batch_per_image, fg_fraction, fg_iou, bg_iou: RoI sampling (the paper: 64 per image, i.e. 128 per
            2-image batch, 25% foreground at IoU ≥ 0.5, background at IoU in [0.1, 0.5)).
        The other arguments: see :class:`RoIDetector`.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, proposals: DenseProposals | None = None,
                 proposals_file: None = None, batch_per_image: int = 128, fg_fraction: float = 0.25,
                 fg_iou: float = 0.5, bg_iou: Sequence[float] = (0.1, 0.5), **head_args) -> None:
        if proposals_file is not None:
            raise ValueError(f"proposals_file is a data setting now: set data.proposals_file={proposals_file} "
                             "(the dataset maps the proposals with the boxes), not model.proposals_file")
        super().__init__(num_classes, backbone, **head_args)
        self.dense = proposals or DenseProposals()
        self.batch_per_image, self.fg_fraction = batch_per_image, fg_fraction
        self.fg_iou, self.bg_iou = fg_iou, tuple(plain(bg_iou))

    def region_proposals(self, images: Tensor, targets: Sequence[dict] | None = None,
                         proposals: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Per image (N_i, 4) float32 xyxy boxes on the device of ``images`` (B, 3, H, W): ``proposals`` if
        given, else in training the targets' ``proposals`` when every target has them, else dense."""
        batch = len(images)
        if proposals is None and self.training and targets is not None:
            carried = sum("proposals" in t for t in targets)
            if carried and carried != len(targets):
                raise ValueError(f"{carried} of {len(targets)} targets carry 'proposals': give every image its "
                                 "proposals or none (mosaic samples have none)")
            if carried:
                proposals = [t["proposals"] for t in targets]
        if proposals is None:
            return [self.dense(images.shape[-2:], images.device)] * batch
        if len(proposals) != batch:
            raise ValueError(f"got proposals for {len(proposals)} images but {batch} images")
        return [p.to(images.device, torch.float32) for p in proposals]

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                proposals: Sequence[Tensor] | None = None):
        """``proposals``: per image (N_i, 4) xyxy pixels of ``images``; see the class docstring."""
        x = stack_images(images)
        if self.training:
            targets = check_targets(targets, len(x))
        proposals = self.region_proposals(x, targets, proposals)
        features = self.features(x)
        sizes = [tuple(x.shape[-2:])] * len(x)
        if self.training:
            rois, labels, regression = sample_rois(proposals, targets, self.batch_per_image, self.fg_fraction,
                                                   self.fg_iou, self.bg_iou, num_classes=self.num_classes)
            return roi_head_loss(*self.head(features, rois, sizes), labels, regression)
        return self.detections(*self.head_in_chunks(features, proposals, sizes), proposals, x.shape[-2:])
