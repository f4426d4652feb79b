"""YOLO family detectors.

YOLOv3 (Redmon & Farhadi, 2018): a Darknet backbone, a top-down neck over three scales, and per scale a
head predicting, for each of its anchors, (tx, ty, tw, th, objectness, C class logits). Boxes follow
YOLOv2's direct location prediction, b_xy = (σ(t_xy) + c_xy) · stride and b_wh = p_wh · e^{t_wh}; classes
are independent sigmoids trained with BCE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detkit.losses.yolo import YOLOLoss
from detkit.models.layers import ConvBNAct
from detkit.models.necks.yolo_fpn import YOLOv3Neck

# e^t is clamped so that an untrained head cannot produce inf boxes: e^4 ≈ 55 × the anchor.
_MAX_LOG_SCALE = 4.0


def stack_images(images: Tensor | Sequence[Tensor]) -> Tensor:
    """(B, 3, H, W) from a batch tensor or a list of same-size (3, H, W) tensors."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return images
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images in a batch must share one size (letterbox them first), got {sorted(sizes)}")
    return torch.stack(list(images))


class YOLOv3(nn.Module):
    """YOLOv3 with the common detkit interface.

    Train mode: ``model(images, targets)`` → dict of scalar losses, ``targets`` a list of dicts with
    ``boxes`` (N, 4) xyxy pixels of ``images`` and ``labels`` (N,) 0-based.
    Eval mode: ``model(images)`` → one dict per image with ``boxes`` (K, 4) xyxy pixels of ``images``,
    ``scores`` (K,) and ``labels`` (K,).

    Args:
        num_classes: C.
        backbone: module returning maps shallowest first, with ``out_channels`` and ``strides`` attributes.
        anchors: per level (shallowest first), a list of (w, h) anchor sizes in input pixels.
        neck_channels: conv-set width per level; defaults to half the backbone's channels.
        neck_pairs: (3×3, 1×1) pairs per conv set (2 in the paper).
        box_loss, loss_weights, level_weights, ratio_thresh, neighbor_cells: see
            :class:`detkit.losses.yolo.YOLOLoss`; ``neighbor_cells`` needs ``xy_scale`` ≥ 2.
        xy_scale: YOLOv4's grid-sensitivity fix, b_xy = (s·σ(t) − (s − 1)/2 + c) · stride; 1 is YOLOv3's
            coding, where a centre on a cell border needs σ(t) → 0 or 1 (infinite logits).
        score_thresh, nms_thresh, max_det, pre_nms_topk: inference post-processing.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        anchors: Sequence[Sequence[Sequence[float]]],
        neck_channels: Sequence[int] | None = None,
        neck_pairs: int = 2,
        act: str = "leaky",
        box_loss: str = "ciou",
        loss_weights: dict | None = None,
        level_weights: Sequence[float] = (4.0, 1.0, 0.4),
        ratio_thresh: float = 4.0,
        xy_scale: float = 1.0,
        neighbor_cells: bool = False,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.6,
        max_det: int = 300,
        pre_nms_topk: int = 3000,
    ) -> None:
        super().__init__()
        strides = list(backbone.strides)
        if len(anchors) != len(strides) or len(level_weights) != len(strides):
            raise ValueError(
                f"backbone gives {len(strides)} levels but {len(anchors)} anchor sets and "
                f"{len(level_weights)} level weights were configured"
            )
        if len({len(a) for a in anchors}) != 1:
            raise ValueError("every level needs the same number of anchors")
        self.num_classes = num_classes
        self.strides = strides
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        num_anchors = self.anchors.shape[1]
        channels = list(neck_channels) if neck_channels else [c // 2 for c in backbone.out_channels]
        self.backbone = backbone
        self.neck = YOLOv3Neck(backbone.out_channels, channels, neck_pairs, act)
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, 2 * c, 3, act=act), nn.Conv2d(2 * c, num_anchors * (5 + num_classes), 1))
            for c in channels
        )
        self.loss = YOLOLoss(num_classes, box_loss, **(loss_weights or {}), level_weights=level_weights,
                             ratio_thresh=ratio_thresh, neighbor_cells=neighbor_cells)
        if neighbor_cells and xy_scale < 2.0:
            raise ValueError("neighbor_cells needs xy_scale >= 2 so a neighbouring cell can reach the centre")
        self.xy_scale = xy_scale
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.max_det, self.pre_nms_topk = max_det, pre_nms_topk
        self._init_head_bias()

    def _init_head_bias(self) -> None:
        # Start objectness near "a few objects per image" and classes near 1/C so that the first steps are
        # not spent unlearning a 50% prior on thousands of empty cells (RetinaNet's prior initialisation).
        for head, stride in zip(self.heads, self.strides):
            conv = head[-1]
            bias = conv.bias.detach().view(self.anchors.shape[1], -1)
            bias[:, 4] = math.log(8 / (256 / stride) ** 2)
            bias[:, 5:] = math.log(0.6 / max(self.num_classes - 0.99, 1.0))
            conv.bias.data = bias.reshape(-1)

    def raw_outputs(self, images: Tensor) -> list[Tensor]:
        """Per level (B, A, H, W, 5 + C) raw predictions."""
        outputs = []
        for head, feature in zip(self.heads, self.neck(self.backbone(images))):
            b, _, h, w = feature.shape
            hidden = head[:-1](feature)
            # The prediction conv and all that follows stay float32 under autocast: box offsets in pixels need
            # more than bf16's 8-bit mantissa.
            with torch.autocast(hidden.device.type, enabled=False):
                out = head[-1](hidden.float())
            out = out.view(b, self.anchors.shape[1], 5 + self.num_classes, h, w)
            outputs.append(out.permute(0, 1, 3, 4, 2))
        return outputs

    def decode(self, outputs: Sequence[Tensor]) -> list[Tensor]:
        """Per level (B, A, H, W, 4) xyxy boxes in input pixels from raw outputs."""
        boxes = []
        for out, anchors, stride in zip(outputs, self.anchors, self.strides):
            _, _, h, w, _ = out.shape
            ys, xs = torch.meshgrid(
                torch.arange(h, device=out.device), torch.arange(w, device=out.device), indexing="ij"
            )
            grid = torch.stack([xs, ys], dim=-1).to(out.dtype)
            xy = (self.xy_scale * out[..., :2].sigmoid() - (self.xy_scale - 1) / 2 + grid) * stride
            wh = anchors.view(1, -1, 1, 1, 2) * out[..., 2:4].clamp(max=_MAX_LOG_SCALE).exp()
            boxes.append(torch.cat([xy - wh / 2, xy + wh / 2], dim=-1))
        return boxes

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x = stack_images(images)
        if x.shape[-1] % self.strides[-1] or x.shape[-2] % self.strides[-1]:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of {self.strides[-1]}")
        outputs = self.raw_outputs(x)
        boxes = self.decode(outputs)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.loss(outputs, boxes, targets, self.anchors, self.strides)
        return self.postprocess(outputs, boxes, x.shape[-2:])

    @torch.no_grad()
    def postprocess(self, outputs: Sequence[Tensor], boxes: Sequence[Tensor], size: Sequence[int]) -> list[dict]:
        """Score = σ(objectness)·σ(class); threshold, top-k, class-aware NMS, clip to the input."""
        batch = outputs[0].shape[0]
        all_boxes = torch.cat([b.reshape(batch, -1, 4) for b in boxes], dim=1)
        raw = torch.cat([o.reshape(batch, -1, 5 + self.num_classes) for o in outputs], dim=1)
        scores = raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()
        h, w = size
        results = []
        for i in range(batch):
            flat = scores[i].flatten()
            keep = (flat > self.score_thresh).nonzero().squeeze(1)
            if len(keep) > self.pre_nms_topk:
                keep = keep[flat[keep].topk(self.pre_nms_topk).indices]
            box_idx, labels = keep // self.num_classes, keep % self.num_classes
            cand = all_boxes[i, box_idx]
            cand = torch.stack(
                [cand[:, 0].clamp(0, w), cand[:, 1].clamp(0, h), cand[:, 2].clamp(0, w), cand[:, 3].clamp(0, h)],
                dim=1,
            )
            kept = batched_nms(cand, flat[keep], labels, self.nms_thresh)[: self.max_det]
            results.append({"boxes": cand[kept], "scores": flat[keep][kept], "labels": labels[kept]})
        return results
