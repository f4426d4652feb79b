"""Region Proposal Network (Ren et al. 2015) over the levels of a feature pyramid (Lin et al. 2017).

One head shared by every level (3×3 conv + ReLU, then 1×1 convs for objectness and deltas) predicts, at each
location, one objectness logit and 4 deltas (:class:`~detkit.boxes.DeltaCoder`, weights 1) per anchor; anchors
come from :func:`~detkit.anchors.grid_anchors` (FPN: one size per level × 3 ratios). Training samples 256
anchors per image, half positive at most (IoU ≥ 0.7, or an object's best anchor), negatives below 0.3
(:func:`~detkit.matching.match_by_iou`); objectness BCE plus smooth-L1 on the positives' deltas. Proposals:
per level the top-k anchors by objectness, decoded, clipped, small ones removed, NMS per level (on objectness
probabilities, as torchvision ranks them), then the best of all levels per image. Boxes are xyxy in input pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou

from detkit.anchors import ANCHOR_LAYOUTS, anchors_per_location, grid_anchors, torchvision_anchors
from detkit.boxes import DeltaCoder, clip_boxes, remove_small
from detkit.losses.box import box_loss
from detkit.matching import BACKGROUND, match_by_iou
from detkit.models.detectors.common import check_targets, plain

__all__ = ["RPNHead", "RegionProposalNetwork", "level_strides", "sample_anchors", "flatten_level"]

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))


def level_strides(image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]) -> list[int]:
    """Nominal stride of each level: the power of 2 nearest input side / map side (exact for inputs that are a
    multiple of the coarsest stride; rounding-up pooling makes it approximate otherwise, as in torchvision's
    ``MultiScaleRoIAlign``)."""
    return [2 ** round(math.log2(image_size[0] / fh)) for fh, _ in feature_sizes]


def flatten_level(x: Tensor, width: int) -> Tensor:
    """(B, A·width, H, W) head output → (B, H·W·A, width): location-major, the order of ``grid_anchors``."""
    b, _, h, w = x.shape
    return x.view(b, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, width)


def sample_anchors(matches: Tensor, batch_size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random positives (match ≥ 0) and negatives (:data:`BACKGROUND`) of one image: at most
    ``positive_fraction · batch_size`` positives, negatives filling the rest. ``matches`` (A,) long → indices of
    the chosen positives and negatives (long)."""
    positive = torch.nonzero(matches >= 0).squeeze(1)
    negative = torch.nonzero(matches == BACKGROUND).squeeze(1)
    num_pos = min(len(positive), int(batch_size * positive_fraction))
    num_neg = min(len(negative), batch_size - num_pos)
    positive = positive[torch.randperm(len(positive), device=matches.device)[:num_pos]]
    negative = negative[torch.randperm(len(negative), device=matches.device)[:num_neg]]
    return positive, negative


class RPNHead(nn.Module):
    """torchvision's ``RPNHead``: ``conv_depth`` 3×3 conv + ReLU, then 1×1 convs to A objectness logits and 4A
    deltas; weights N(0, 0.01²), biases 0."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        layers = []
        for _ in range(conv_depth):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
        self.conv = nn.Sequential(*layers)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Levels (B, C, H_l, W_l) → objectness (B, N) and deltas (B, N, 4), N = Σ H_l·W_l·A, level by level."""
        logits, deltas = [], []
        for x in maps:
            t = self.conv(x)
            logits.append(flatten_level(self.cls_logits(t), 1).squeeze(-1))
            deltas.append(flatten_level(self.bbox_pred(t), 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


class RegionProposalNetwork(nn.Module):
    """RPN over a list of levels, with the common anchor generator and matcher.

    Args:
        in_channels: channels of every level (the FPN width).
        sizes: anchor sizes (pixels) of each level; ``ratios`` (h/w) shared by every level.
        fg_iou, bg_iou: an anchor is positive at IoU ≥ ``fg_iou`` with an object (or as an object's best
            anchor), negative below ``bg_iou``, ignored in between.
        batch_per_image, positive_fraction: anchors sampled per image for the loss, and the most positives.
        pre_nms_topk, post_nms_topk: proposals kept per level before NMS and per image after it, as
            ``{"train": n, "test": n}`` (torchvision's FPN values: 2000/1000 per level, 2000/1000 per image).
        nms_threshold: IoU of the per-level NMS.
        min_size: proposals narrower or lower than this (pixels) are dropped.
        beta: smooth-L1 transition of the box loss (1/9 as in Detectron and torchvision; 0 gives L1).
        conv_depth: 3×3 convs of the head.
        anchor_offset: anchor centres at (j + offset)·stride (see :func:`~detkit.anchors.grid_anchors`).
        anchor_layout: ``centered`` (:func:`~detkit.anchors.grid_anchors` at the levels' strides with
            ``anchor_offset``) or ``torchvision`` (:func:`~detkit.anchors.torchvision_anchors` of the padded
            input: torchvision's ``AnchorGenerator``, for converted torchvision weights).
    """

    def __init__(self, in_channels: int, sizes: Sequence[Sequence[float]] = FPN_SIZES,
                 ratios: Sequence[float] = (0.5, 1.0, 2.0), fg_iou: float = 0.7, bg_iou: float = 0.3,
                 batch_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_topk: dict | None = None, post_nms_topk: dict | None = None, nms_threshold: float = 0.7,
                 min_size: float = 1e-3, beta: float = 1 / 9, conv_depth: int = 1,
                 anchor_offset: float = 0.5, anchor_layout: str = "centered") -> None:
        super().__init__()
        if anchor_layout not in ANCHOR_LAYOUTS:
            raise ValueError(f"unknown anchor layout {anchor_layout!r}; expected one of {', '.join(ANCHOR_LAYOUTS)}")
        self.sizes, self.ratios = plain(sizes, tuple), plain(ratios, tuple)  # hashable cache keys
        counts = set(anchors_per_location(self.sizes, self.ratios))
        if len(counts) != 1:
            raise ValueError(f"a shared RPN head needs the same number of anchors on every level, got {counts}")
        self.num_anchors = counts.pop()
        self.head = RPNHead(in_channels, self.num_anchors, conv_depth)
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_per_image, self.positive_fraction = batch_per_image, positive_fraction
        self.pre_nms_topk = dict(pre_nms_topk or {"train": 2000, "test": 1000})
        self.post_nms_topk = dict(post_nms_topk or {"train": 2000, "test": 1000})
        for name, value in (("pre_nms_topk", self.pre_nms_topk), ("post_nms_topk", self.post_nms_topk)):
            if set(value) != {"train", "test"}:
                raise ValueError(f"{name} needs a train and a test value, got {sorted(value)}")
        self.nms_threshold, self.min_size, self.beta = nms_threshold, min_size, beta
        self.anchor_offset, self.anchor_layout = anchor_offset, anchor_layout
        self.coder = DeltaCoder((1.0, 1.0, 1.0, 1.0))
        self._anchors: dict[tuple, list[Tensor]] = {}

    def anchors(self, feature_sizes: Sequence[Sequence[int]], strides: Sequence[int],
                device: torch.device | str = "cpu", padded_size: Sequence[int] | None = None) -> list[Tensor]:
        """(H_l·W_l·A, 4) xyxy anchors per level for maps of ``feature_sizes`` and ``strides`` (the
        ``torchvision`` layout derives its strides from ``padded_size``, the (H, W) of the padded input);
        cached."""
        key = (tuple(map(tuple, feature_sizes)), tuple(strides), tuple(padded_size or ()), str(device))
        if key not in self._anchors:
            if self.anchor_layout == "torchvision":
                levels = torchvision_anchors(feature_sizes, padded_size, self.sizes, self.ratios)
            else:
                levels = grid_anchors(feature_sizes, strides, self.sizes, self.ratios, self.anchor_offset)
            self._anchors[key] = [a.to(device) for a in levels]
        return self._anchors[key]

    def forward(self, maps: Sequence[Tensor], image_size: Sequence[int], targets: Sequence[dict] | None = None,
                strides: Sequence[int] | None = None, padded_size: Sequence[int] | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Levels (B, C, H_l, W_l) of an input of ``image_size`` = (H, W) → proposals, one (P_i, 4) xyxy tensor
        per image clipped to ``image_size`` (best first), and in training the losses ``loss_objectness`` and
        ``loss_rpn_box``. ``strides`` of the levels default to :func:`level_strides`; ``padded_size`` is the
        (H, W) of the zero-padded input the maps come from (default ``image_size``)."""
        if len(maps) != len(self.sizes):
            raise ValueError(f"RPN configured with anchor sizes for {len(self.sizes)} levels, got {len(maps)} "
                             f"feature maps")
        # The head may run under autocast; matching, decoding and losses need float32.
        objectness, deltas = (t.float() for t in self.head(maps))
        feature_sizes = [m.shape[-2:] for m in maps]
        strides = strides or level_strides(image_size, feature_sizes)
        anchors = self.anchors(feature_sizes, strides, objectness.device, tuple(padded_size or image_size))
        proposals = self.propose(objectness.detach(), deltas.detach(), anchors, image_size)
        losses = {}
        if self.training:
            check_targets(targets, len(objectness))
            losses = self.loss(objectness, deltas, torch.cat(anchors), targets)
        return proposals, losses

    @torch.no_grad()
    def propose(self, objectness: Tensor, deltas: Tensor, anchors: Sequence[Tensor],
                image_size: Sequence[int]) -> list[Tensor]:
        """Objectness (B, N), deltas (B, N, 4) and per-level anchors → per-image proposals (P_i, 4) xyxy."""
        mode = "train" if self.training else "test"
        pre, post = self.pre_nms_topk[mode], self.post_nms_topk[mode]
        batch = objectness.shape[0]
        scores, boxes, levels, start = [], [], [], 0
        for level, level_anchors in enumerate(anchors):
            n = len(level_anchors)
            top, idx = objectness[:, start:start + n].topk(min(pre, n), dim=1)
            picked = deltas[:, start:start + n].gather(1, idx[..., None].expand(-1, -1, 4))
            decoded = self.coder.decode(picked.reshape(-1, 4), level_anchors[idx.reshape(-1)])
            boxes.append(decoded.view(batch, -1, 4))
            scores.append(top)
            levels.append(torch.full_like(idx, level))
            start += n
        boxes, scores, levels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels, 1)
        proposals = []
        for b in range(batch):
            img_boxes = clip_boxes(boxes[b], tuple(image_size))
            keep = remove_small(img_boxes, self.min_size)
            # Probabilities, not logits: saturated ones tie, and torchvision's NMS breaks those ties its way.
            keep = keep[batched_nms(img_boxes[keep], scores[b, keep].sigmoid(), levels[b, keep], self.nms_threshold)]
            proposals.append(img_boxes[keep[:post]])
        return proposals

    def loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor,
             targets: Sequence[dict]) -> dict[str, Tensor]:
        """Objectness BCE over the sampled anchors and smooth-L1 over the positives' deltas, both divided by the
        number of sampled anchors (torchvision's normalisation). ``anchors`` (N, 4) xyxy, all levels."""
        positives, negatives, box_targets = [], [], []
        for b, target in enumerate(targets):
            gt = target["boxes"].to(anchors)
            matches = match_by_iou(box_iou(gt, anchors), self.fg_iou, self.bg_iou)
            pos, neg = sample_anchors(matches, self.batch_per_image, self.positive_fraction)
            positives.append(b * len(anchors) + pos)
            negatives.append(b * len(anchors) + neg)
            box_targets.append(self.coder.encode(gt[matches[pos]], anchors[pos]))
        positives, negatives = torch.cat(positives), torch.cat(negatives)
        sampled = torch.cat([positives, negatives])
        labels = torch.cat([torch.ones_like(positives), torch.zeros_like(negatives)]).to(objectness.dtype)
        normaliser = max(1, len(sampled))
        loss_obj = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled], labels, reduction="sum")
        loss_box = box_loss(deltas.reshape(-1, 4)[positives], torch.cat(box_targets), "smooth_l1",
                            reduction="sum", beta=self.beta)
        return {"loss_objectness": loss_obj / normaliser, "loss_rpn_box": loss_box / normaliser}
