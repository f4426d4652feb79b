"""Test-time augmentation for any detector in the common interface.

The wrapped model sees the batch as given, horizontally flipped and resized by each of ``scales``; each view's
boxes are mapped back to the input's pixel frame and the union is merged per image by class-aware NMS. Only
``model(images) -> [{boxes, scores, labels}]`` is used, so any detector (torchvision's included) works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms


class TestTimeAugmentation(nn.Module):
    """Detector wrapper: ``forward(images)`` with images (B, 3, H, W) returns one dict per image with
    ``boxes`` (N, 4) xyxy pixels of the input, ``scores`` (N,), ``labels`` (N,).

    Args:
        model: detector in the common interface (eval mode).
        scales: extra views resized by these factors, rounded to a multiple of ``stride`` per side (the
            resolution steps a strided backbone accepts).
        flip: add a horizontally flipped view. Leave it off for classes that are not mirror-symmetric
            (digits, text), where a flipped object looks like another class.
        iou_threshold: class-aware NMS threshold that merges the views' detections.
        max_detections: detections kept per image after merging, best first.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, model: nn.Module, scales: Sequence[float] = (0.83, 1.17), flip: bool = True,
                 iou_threshold: float = 0.5, max_detections: int = 300, stride: int = 32) -> None:
        super().__init__()
        self.model, self.scales, self.flip = model, tuple(scales), flip
        self.iou_threshold, self.max_detections, self.stride = iou_threshold, max_detections, stride

    def _views(self, images: Tensor) -> list[tuple[Tensor, float, float, bool]]:
        """(view, x factor, y factor, flipped): multiplying a view's boxes by the factors (after un-flipping)
        gives input pixels."""
        h, w = images.shape[-2:]
        views = [(images, 1.0, 1.0, False)]
        if self.flip:
            views.append((images.flip(-1), 1.0, 1.0, True))
        for s in self.scales:
            sh, sw = (max(self.stride, round(n * s / self.stride) * self.stride) for n in (h, w))
            resized = F.interpolate(images, size=(sh, sw), mode="bilinear", align_corners=False)
            views.append((resized, w / sw, h / sh, False))
        return views

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[dict]:
        width = images.shape[-1]
        per_image: list[list[dict]] = [[] for _ in range(images.shape[0])]
        for view, fx, fy, flipped in self._views(images):
            for merged, det in zip(per_image, self.model(view)):
                boxes = to_input_frame(det["boxes"], fx, fy, flipped, width)
                merged.append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
        return [merge_detections(dets, self.iou_threshold, self.max_detections) for dets in per_image]


def to_input_frame(boxes: Tensor, fx: float, fy: float, flipped: bool, width: int) -> Tensor:
    """(N, 4) xyxy boxes of one view in pixels of the input: un-mirrored about a ``width``-pixel-wide view if
    ``flipped`` (x becomes width - x, so x1 and x2 swap), then multiplied by the view-to-input factors."""
    boxes = boxes.float()
    if flipped:
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return boxes * boxes.new_tensor([fx, fy, fx, fy])


def merge_detections(views: Sequence[dict], iou_threshold: float = 0.5, max_detections: int = 300) -> dict:
    """One image's detections from several views (each ``boxes`` (N_v, 4) xyxy in the same pixel frame,
    ``scores`` (N_v,), ``labels`` (N_v,)) merged into one set: their union, thinned by class-aware NMS at
    ``iou_threshold``, best first, at most ``max_detections``. A box found by several views is kept once, with
    its highest score; views that agree exactly give back one view's detections (when those hold no same-class
    pair above ``iou_threshold``, as a detector's NMS output does not)."""
    boxes, scores, labels = (torch.cat([d[k] for d in views]) for k in ("boxes", "scores", "labels"))
    keep = batched_nms(boxes, scores.float(), labels, iou_threshold)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
