"""RetinaNet (Lin et al., ICCV 2017): a one-stage detector trained with the focal loss.

A ResNet gives C3–C5; the FPN makes P3–P5, P6 (3×3 stride-2 conv of C5, or of P5) and P7 (3×3 stride-2 conv of
ReLU(P6)). At every location of every level 9 anchors (sizes 2^{0, 1/3, 2/3}·(32 … 512) × ratios 0.5, 1, 2);
two subnets shared by all levels (4 convs of 256 + ReLU each) predict K sigmoid class scores and 4 deltas
(:class:`~detkit.boxes.DeltaCoder`, weights 1) per anchor. Anchors at IoU ≥ 0.5 with an object are positive,
below 0.4 negative, ignored in between; the loss is the sigmoid focal loss (α 0.25, γ 2) over all non-ignored
(anchor, class) pairs plus smooth-L1 on the positives' deltas, both divided by the number of positives.
``configs/model/retinanet.yaml`` is the paper's ResNet-50 setting, ``retinanet_cpu.yaml`` a CPU-sized one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from detkit.anchors import ANCHOR_LAYOUTS, anchors_per_location, grid_anchors, torchvision_anchors
from detkit.boxes import DeltaCoder
from detkit.losses.box import box_loss
from detkit.losses.focal import sigmoid_focal_loss
from detkit.matching import IGNORE, match_by_iou
from detkit.models.detectors.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_images,
    check_targets,
    register_normalization,
)
from detkit.models.necks.fpn import FPN
from detkit.models.rpn import flatten_level
from detkit.postprocess import postprocess_detections

__all__ = ["RetinaNetHead", "RetinaNet", "retinanet_sizes"]


def retinanet_sizes(base_sizes: Sequence[float] = (32, 64, 128, 256, 512),
                    scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))) -> list[list[float]]:
    """Anchor sizes of each level: every base size times every octave scale (the paper's 2^{0, 1/3, 2/3})."""
    return [[base * s for s in scales] for base in base_sizes]


NORMS = ("none", "gn")


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        if norm == "gn":
            layers.append(nn.GroupNorm(math.gcd(32, channels), channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Class and box subnets, shared across levels: ``num_convs`` 3×3 conv + ReLU, then a 3×3 conv to A·K class
    logits (bias −log((1 − π)/π), so every initial score is ``prior`` π) or to 4A deltas. Weights N(0, 0.01²).

    ``norm="gn"`` puts a GroupNorm (32 groups at most) before each ReLU, as detectron2's RetinaNet option and
    torchvision's ``retinanet_resnet50_fpn_v2`` do: with Adam at the trainer's learning rates the paper's plain
    subnets (made for SGD) lost every ReLU of the class subnet within 60 steps in a 2-image overfit.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior: float = 0.01, norm: str = "none") -> None:
        super().__init__()
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior probability must be in (0, 1), got {prior}")
        if norm not in NORMS:
            raise ValueError(f"unknown subnet norm {norm!r}; expected one of {', '.join(NORMS)}")
        self.num_classes = num_classes
        self.cls_subnet = _subnet(in_channels, num_convs, norm)
        self.box_subnet = _subnet(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Levels (B, C, H_l, W_l) → class logits (B, N, K) and deltas (B, N, 4), N = Σ H_l·W_l·A."""
        logits = [flatten_level(self.cls_logits(self.cls_subnet(x)), self.num_classes) for x in maps]
        deltas = [flatten_level(self.bbox_pred(self.box_subnet(x)), 4) for x in maps]
        return torch.cat(logits, 1), torch.cat(deltas, 1)


class RetinaNet(nn.Module):
    """RetinaNet with the common detkit interface.

    Train mode: ``model(images, targets)`` → ``loss_cls`` (focal), ``loss_box`` (smooth-L1); ``targets`` with
    ``boxes`` (N, 4) xyxy pixels of ``images`` and ``labels`` (N,) 0-based. Eval mode: ``model(images)`` → per
    image ``boxes`` (D, 4) xyxy pixels, ``scores``, ``labels``. ``images`` are 0–1 RGB, (B, 3, H, W) or a list
    of same-size (3, H, W).

    Args:
        num_classes: K object classes (no background class: an anchor is background when every score is low).
        backbone: module returning [C2, C3, C4, C5] with ``out_channels``.
        fpn_channels: width of P3–P7 and of the subnets (256).
        p6_from: ``c5`` (the paper) or ``p5`` (torchvision's ``retinanet_resnet50_fpn``).
        num_convs: convs per subnet (4); ``head_norm``: ``none`` (the paper) or ``gn`` (:class:`RetinaNetHead`).
        anchor_sizes, anchor_scales: base size of each level (P3–P7) and the octave scales applied to it
            (:func:`retinanet_sizes`); with ``anchor_scales`` None, ``anchor_sizes`` lists each level's sizes
            (torchvision's truncated ones: [[32, 40, 50], [64, 80, 101], …]). ``ratios`` (h/w) shared by all
            levels.
        anchor_layout: ``centered`` (:func:`~detkit.anchors.grid_anchors`, centres at cell centres) or
            ``torchvision`` (:func:`~detkit.anchors.torchvision_anchors`, for converted torchvision weights).
        fg_iou, bg_iou: positive at IoU ≥ ``fg_iou`` (or as an object's best anchor), negative below ``bg_iou``.
        alpha, gamma: focal loss; ``prior``: initial foreground probability π of every class score.
        box_beta: smooth-L1 transition of the box loss (0.11 as in Detectron; 0 gives L1, torchvision's).
        score_thresh, topk_per_level, nms_thresh, max_det: inference keeps, on each level, the
            ``topk_per_level`` best (anchor, class) pairs scoring above ``score_thresh``, then class-wise NMS
            and the ``max_det`` best.
        size_divisible: inputs are zero-padded to a multiple of this.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, fpn_channels: int = 256, p6_from: str = "c5",
                 num_convs: int = 4, head_norm: str = "none",
                 anchor_sizes: Sequence[float] | Sequence[Sequence[float]] = (32, 64, 128, 256, 512),
                 anchor_scales: Sequence[float] | None = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
                 ratios: Sequence[float] = (0.5, 1.0, 2.0), fg_iou: float = 0.5, bg_iou: float = 0.4,
                 alpha: float = 0.25, gamma: float = 2.0, prior: float = 0.01, box_beta: float = 0.11,
                 score_thresh: float = 0.05, topk_per_level: int = 1000, nms_thresh: float = 0.5,
                 max_det: int = 100, size_divisible: int = 32, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, anchor_layout: str = "centered") -> None:
        super().__init__()
        if anchor_layout not in ANCHOR_LAYOUTS:
            raise ValueError(f"unknown anchor layout {anchor_layout!r}; expected one of {', '.join(ANCHOR_LAYOUTS)}")
        if len(backbone.out_channels) != 4:
            raise ValueError(f"RetinaNet needs a backbone with 4 maps (C2–C5), got {len(backbone.out_channels)}")
        self.num_classes = num_classes
        self.backbone = backbone
        self.neck = FPN(backbone.out_channels, fpn_channels, first_level=1, extra="p6p7", p6_from=p6_from)
        if anchor_scales is None:
            self.sizes = [[float(s) for s in level] for level in anchor_sizes]
        else:
            self.sizes = retinanet_sizes([float(s) for s in anchor_sizes], [float(s) for s in anchor_scales])
        self.anchor_layout = anchor_layout
        self.ratios = [float(r) for r in ratios]
        if len(self.sizes) != self.neck.num_levels:
            raise ValueError(f"anchor sizes for {len(self.sizes)} levels, but the FPN has {self.neck.num_levels}")
        counts = set(anchors_per_location(self.sizes, self.ratios))
        if len(counts) != 1:
            raise ValueError(f"shared subnets need the same number of anchors on every level, got {counts}")
        self.num_anchors = counts.pop()
        self.head = RetinaNetHead(fpn_channels, self.num_anchors, num_classes, num_convs, prior, head_norm)
        self.fg_iou, self.bg_iou, self.alpha, self.gamma, self.box_beta = fg_iou, bg_iou, alpha, gamma, box_beta
        self.score_thresh, self.topk_per_level = score_thresh, topk_per_level
        self.nms_thresh, self.max_det = nms_thresh, max_det
        self.size_divisible = size_divisible
        self.coder = DeltaCoder((1.0, 1.0, 1.0, 1.0))
        register_normalization(self, image_mean, image_std)
        self._anchors: dict[tuple, list[Tensor]] = {}

    def anchors(self, feature_sizes: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                padded_size: Sequence[int] | None = None) -> list[Tensor]:
        """(H_l·W_l·A, 4) xyxy anchors per level for maps of ``feature_sizes`` (P3–P7) of a padded input of
        ``padded_size`` (H, W) (read by the ``torchvision`` layout only); cached."""
        key = (tuple(map(tuple, feature_sizes)), tuple(padded_size or ()), str(device))
        if key not in self._anchors:
            if self.anchor_layout == "torchvision":
                levels = torchvision_anchors(feature_sizes, padded_size, self.sizes, self.ratios)
            else:
                levels = grid_anchors(feature_sizes, self.neck.strides, self.sizes, self.ratios)
            self._anchors[key] = [a.to(device) for a in levels]
        return self._anchors[key]

    def raw_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Normalised, padded (B, 3, H, W) → class logits (B, N, K), deltas (B, N, 4), anchors per level."""
        maps = self.neck(self.backbone(x))
        # The subnets may run under autocast; matching, decoding and losses need float32.
        logits, deltas = (t.float() for t in self.head(maps))
        return logits, deltas, self.anchors([m.shape[-2:] for m in maps], x.device, tuple(x.shape[-2:]))

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x = batch_images(images, self.image_mean, self.image_std, self.size_divisible)
        size = tuple(images.shape[-2:]) if isinstance(images, Tensor) else tuple(images[0].shape[-2:])
        if self.training:
            check_targets(targets, x.shape[0], self.num_classes)
        logits, deltas, anchors = self.raw_outputs(x)
        if self.training:
            return self.loss(logits, deltas, torch.cat(anchors), targets)
        return self.postprocess(logits, deltas, anchors, size)

    def loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Focal loss over non-ignored anchors and smooth-L1 over positives, each summed and divided by the
        number of positive anchors in the batch (at least 1). ``anchors`` (N, 4) xyxy, all levels."""
        class_targets = torch.zeros_like(logits)
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        positives, box_targets = [], []
        for b, target in enumerate(targets):
            gt = target["boxes"].to(anchors)
            matches = match_by_iou(box_iou(gt, anchors), self.fg_iou, self.bg_iou)
            valid[b] = matches != IGNORE
            pos = torch.nonzero(matches >= 0).squeeze(1)
            class_targets[b, pos, target["labels"].to(pos.device)[matches[pos]]] = 1.0
            positives.append(b * len(anchors) + pos)
            box_targets.append(self.coder.encode(gt[matches[pos]], anchors[pos]))
        positives = torch.cat(positives)
        normaliser = max(1, len(positives))
        loss_cls = sigmoid_focal_loss(logits[valid], class_targets[valid], self.alpha, self.gamma, reduction="sum")
        loss_box = box_loss(deltas.reshape(-1, 4)[positives], torch.cat(box_targets), "smooth_l1", reduction="sum",
                            beta=self.box_beta)
        return {"loss_cls": loss_cls / normaliser, "loss_box": loss_box / normaliser}

    @torch.no_grad()
    def postprocess(self, logits: Tensor, deltas: Tensor, anchors: Sequence[Tensor],
                    size: Sequence[int]) -> list[dict]:
        """Per level the ``topk_per_level`` best (anchor, class) scores above ``score_thresh``; then decoded
        boxes clipped to ``size`` = (H, W), class-wise NMS and the ``max_det`` best
        (:func:`~detkit.postprocess.postprocess_detections`)."""
        batch, _, num_classes = logits.shape
        scores = torch.zeros_like(logits)
        start = 0
        for level_anchors in anchors:
            n = len(level_anchors)
            # Pairs outside the level's top-k score 0 and fall under any positive threshold.
            level = logits[:, start:start + n].sigmoid().reshape(batch, -1)
            top, idx = level.topk(min(self.topk_per_level, level.shape[1]), dim=1)
            scores[:, start:start + n] = torch.zeros_like(level).scatter_(1, idx, top).view(batch, n, num_classes)
            start += n
        boxes = self.coder.decode(deltas.reshape(-1, 4), torch.cat(anchors).repeat(batch, 1)).view(batch, -1, 4)
        return postprocess_detections(boxes, scores, self.score_thresh, self.nms_thresh, self.max_det, "nms",
                                      self.topk_per_level * len(anchors), image_size=tuple(size))
