"""Faster R-CNN with a Feature Pyramid Network (Lin et al., CVPR 2017).

A ResNet gives C2–C5; the FPN makes P2–P6 (P6 subsampled from P5). The RPN (:mod:`detkit.models.rpn`) runs on
every level with one anchor size per level (32 … 512) × 3 ratios; its proposals are pooled by RoIAlign from
the level k = ⌊4 + log2(√(wh)/224)⌋ clamped to P2–P5 (``torchvision.ops.MultiScaleRoIAlign``) into the shared
Fast R-CNN box head (:mod:`detkit.models.roi_heads`: two FC layers of 1024, K + 1 class scores, 4K deltas).
``configs/model/fpn_rcnn.yaml`` is the paper's ResNet-50 setting, ``fpn_rcnn_cpu.yaml`` a CPU-sized one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from detkit.models.deformable import DeformableRoIPooler
from detkit.models.detectors.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_images,
    check_targets,
    register_normalization,
)
from detkit.models.necks.fpn import FPN
from detkit.models.roi_heads import RoIBoxHead, roi_detections, roi_head_loss, sample_rois
from detkit.models.rpn import RegionProposalNetwork

__all__ = ["FPNRCNN"]


class FPNRCNN(nn.Module):
    """Faster R-CNN + FPN with the common detkit interface.

    Train mode: ``model(images, targets)`` → ``loss_objectness``, ``loss_rpn_box`` (RPN), ``loss_cls``,
    ``loss_box`` (box head); ``targets`` with ``boxes`` (N, 4) xyxy pixels of ``images`` and ``labels`` (N,)
    0-based. Eval mode: ``model(images)`` → per image ``boxes`` (K, 4) xyxy pixels, ``scores``, ``labels``.
    ``images`` are 0–1 RGB, (B, 3, H, W) or a list of same-size (3, H, W).

    Args:
        num_classes: K object classes (the box head predicts K + 1).
        backbone: module returning [C2, C3, C4, C5] with ``out_channels`` (:class:`~detkit.models.backbones.
            resnet.ResNet`).
        fpn_channels: width of P2–P6 (256).
        rpn: keyword arguments of :class:`~detkit.models.rpn.RegionProposalNetwork` (anchor sizes, IoU
            thresholds, sampling, top-k before/after NMS for train and test).
        pool_size, sampling_ratio: RoIAlign output side and samples per bin.
        deformable_roi: deformable RoI pooling (:class:`~detkit.models.deformable.DeformableRoIPooler`) around
            the RoIAlign: each bin moved by an offset predicted from the RoI's pooled features.
        representation: width of the box head's two FC layers (1024).
        roi_batch, roi_fg_fraction, roi_fg_iou, roi_bg_iou: RoIs sampled per image for the box head, the
            foreground share, foreground IoU and background IoU range (:func:`~detkit.models.roi_heads.
            sample_rois`).
        box_beta: smooth-L1 transition of the box head's loss.
        score_thresh, nms_thresh, max_det: per-class score threshold, NMS IoU and detections per image.
        size_divisible: inputs are zero-padded to a multiple of this (the coarsest stride).
        background_box: the box head also has the background class's (unused) regressor, as torchvision's
            Faster R-CNN does: the same parameter count as ``fasterrcnn_resnet50_fpn``.
        background_logits: class-score rows that mean background (:class:`~detkit.models.roi_heads.RoIBoxHead`;
            11 for torchvision's 91-way COCO weights).
        det_pre_nms_topk, det_min_size: the best (box, class) pairs kept before the box head's NMS (None: all)
            and the smallest side a detection may have (torchvision: None and 0.01).
    """

    def __init__(self, num_classes: int, backbone: nn.Module, fpn_channels: int = 256, rpn: Mapping | None = None,
                 pool_size: int = 7, sampling_ratio: int = 2, representation: int = 1024, roi_batch: int = 512,
                 roi_fg_fraction: float = 0.25, roi_fg_iou: float = 0.5,
                 roi_bg_iou: Sequence[float] = (0.0, 0.5), box_beta: float = 1.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, max_det: int = 100, size_divisible: int = 32, background_box: bool = True,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 background_logits: int = 1, det_pre_nms_topk: int | None = 1000, det_min_size: float = 0.0,
                 deformable_roi: bool = False) -> None:
        super().__init__()
        if len(backbone.out_channels) != 4:
            raise ValueError(f"FPN R-CNN needs a backbone with 4 maps (C2–C5), got {len(backbone.out_channels)}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = FPN(backbone.out_channels, fpn_channels, first_level=0, extra="pool")
        self.level_names = [f"p{i + 2}" for i in range(self.neck.num_levels)]
        self.rpn = RegionProposalNetwork(fpn_channels, **dict(rpn or {}))
        pooler = MultiScaleRoIAlign(self.level_names[:4], pool_size, sampling_ratio)
        if deformable_roi:
            pooler = DeformableRoIPooler(pooler, fpn_channels)
        self.roi_head = RoIBoxHead(pooler, fpn_channels, pool_size, num_classes, representation,
                                   background_box=background_box, background_logits=background_logits)
        self.roi_sampling = dict(batch_per_image=roi_batch, fg_fraction=roi_fg_fraction, fg_iou=roi_fg_iou,
                                 bg_iou=tuple(roi_bg_iou))
        self.box_beta = box_beta
        self.score_thresh, self.nms_thresh, self.max_det = score_thresh, nms_thresh, max_det
        self.det_pre_nms_topk, self.det_min_size = det_pre_nms_topk, det_min_size
        self.size_divisible = size_divisible
        register_normalization(self, image_mean, image_std)

    def features(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Normalised, padded (B, 3, H, W) → P2–P6 by name (``p2`` … ``p6``), (B, fpn_channels, H/s, W/s)."""
        return OrderedDict(zip(self.level_names, self.neck(self.backbone(x))))

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x = batch_images(images, self.image_mean, self.image_std, self.size_divisible)
        batch = x.shape[0]
        size = tuple(images.shape[-2:]) if isinstance(images, Tensor) else tuple(images[0].shape[-2:])
        if self.training:
            check_targets(targets, batch, self.num_classes)
        features = self.features(x)
        padded = [tuple(x.shape[-2:])] * batch  # the pooler infers each level's scale from it
        proposals, losses = self.rpn(list(features.values()), size, targets, self.neck.strides, padded[0])
        if self.training:
            rois, labels, regression = sample_rois(proposals, targets, **self.roi_sampling,
                                                   num_classes=self.num_classes)
            class_logits, box_deltas = self.roi_head(features, rois, padded)
            losses.update(roi_head_loss(class_logits.float(), box_deltas.float(), labels, regression,
                                        beta=self.box_beta))
            return losses
        class_logits, box_deltas = self.roi_head(features, proposals, padded)
        return roi_detections(class_logits, box_deltas, proposals, [size] * batch, self.score_thresh,
                              self.nms_thresh, self.max_det, pre_nms_topk=self.det_pre_nms_topk,
                              min_size=self.det_min_size)
