"""SSD (Liu et al. 2016) and SSDLite (Sandler et al. 2018).

A backbone gives six maps; on each, 3×3 prediction convs output, for each of the k default boxes of every
cell, C + 1 class logits (softmax, column 0 the background) and 4 offsets from the box (variances 0.1, 0.2).
SSDLite is the same detector with depthwise-separable prediction convs on a MobileNetV2 backbone
(``configs/model/ssdlite.yaml``); SSD300 is ``configs/model/ssd300.yaml``. The options ``priors.scales``,
``extra_logits``, ``class_topk`` and ``resize_to`` reproduce torchvision's ``ssd300_vgg16`` at inference
(:mod:`detkit.convert.tv_ssd` sets them in a converted checkpoint's config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.anchors import SSD300, ssd_default_boxes, ssd_prior_config, ssd_relative_boxes
from detkit.losses.multibox import MATCHERS, multibox_loss, ssd_coder
from detkit.models.backbones.mobilenet import normal_init, separable_conv
from detkit.models.detectors.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_targets,
    normalize,
    plain,
    register_normalization,
    stack_images,
)
from detkit.postprocess import postprocess_detections

__all__ = ["SSDHead", "SSD", "boxes_per_cell"]

def boxes_per_cell(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    """Default boxes per cell of each level: two squares plus two per ratio (4, 6, 6, 6, 4, 4 for SSD300)."""
    return [2 + 2 * len(r) for r in aspect_ratios]


class SSDHead(nn.Module):
    """Per level, one prediction conv for class logits and one for box offsets.

    Args:
        in_channels: channels of each level's map.
        num_boxes: default boxes per cell of each level.
        num_logits: C + 1 (background included).
        separable: SSDLite's depthwise-separable 3×3 convs instead of plain 3×3 convs.
    """

    def __init__(self, in_channels: Sequence[int], num_boxes: Sequence[int], num_logits: int,
                 separable: bool = False) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> nn.Module:
            return separable_conv(c_in, c_out) if separable else nn.Conv2d(c_in, c_out, 3, padding=1)

        self.num_logits = num_logits
        self.cls = nn.ModuleList(conv(c, k * num_logits) for c, k in zip(in_channels, num_boxes))
        self.box = nn.ModuleList(conv(c, k * 4) for c, k in zip(in_channels, num_boxes))

    @staticmethod
    def _flatten(x: Tensor, width: int) -> Tensor:
        # (B, k·width, H, W) → (B, H·W·k, width): location-major, the order of ssd_default_boxes.
        b, _, h, w = x.shape
        return x.view(b, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, width)

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Maps (B, C_l, H_l, W_l) → class logits (B, A, C + 1) and offsets (B, A, 4), A = Σ H_l·W_l·k_l."""
        logits = [self._flatten(conv(x), self.num_logits) for conv, x in zip(self.cls, maps)]
        deltas = [self._flatten(conv(x), 4) for conv, x in zip(self.box, maps)]
        return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)


class SSD(nn.Module):
    """SSD with the common detkit interface.

    Train mode: ``model(images, targets)`` → ``loss_box``, ``loss_cls`` (:func:`~detkit.losses.multibox.
    multibox_loss`), ``targets`` with ``boxes`` (N, 4) xyxy pixels of ``images`` and ``labels`` (N,) 0-based.
    Eval mode: ``model(images)`` → per image ``boxes`` (K, 4) xyxy pixels of ``images``, ``scores``, ``labels``
    (0-based object classes; the background is never returned).

    ``images`` are 0–1 RGB, (B, 3, H, W) or a list of same-size (3, H, W) (of any sizes with ``resize_to``).
    Default boxes follow ``priors`` (the arguments of :func:`~detkit.anchors.ssd_default_boxes`,
    :data:`~detkit.anchors.SSD300` by default) at its image size, and are recomputed from the feature map sizes
    for any other input size (:func:`~detkit.anchors.ssd_prior_config`). Priors given as ``scales`` (with
    ``aspect_ratios``, optional ``steps`` and ``clip``) are fractions of the input's sides instead
    (:func:`~detkit.anchors.ssd_relative_boxes`, torchvision's default boxes).

    Args:
        num_classes: C object classes (the head predicts C + 1).
        backbone: module returning six maps, with ``out_channels``.
        priors: default-box configuration at its reference ``image_size``.
        separable_head: SSDLite's depthwise-separable prediction convs.
        iou_threshold, neg_pos_ratio, variances, box_weight: see :func:`~detkit.losses.multibox.multibox_loss`.
        matcher: which default boxes are positive: ``iou`` (SSD's: IoU above ``iou_threshold``, and each
            object's best box) or ``atss`` (ATSS's per-object threshold from the ``atss_topk`` boxes nearest
            its centre on each map: :func:`~detkit.matching.match_atss`) added to SSD's: a box either rule
            makes positive is positive).
        atss_topk: candidates per map of the ``atss`` matcher (9, ATSS's).
        prior_size: the input side (pixels) at which default boxes take their sizes; at any other input
            (evaluation at ``data.test_size``, multi-scale training) they keep those pixel sizes, as anchors do,
            and only their centres follow the maps. The configs set the training size, ``data.img_size``. None:
            sizes are shares of each input (SSD's fixed input; a network trained at 384 px then predicts boxes
            1.25× too large at 480). Ignored with ``resize_to``, whose input is always one size.
        score_thresh, nms_thresh, max_det: per-class score threshold, NMS IoU and detections kept per image.
        pre_nms_topk: (box, class) candidates kept before NMS; None: 400 per class, the budget of Caffe SSD's
            per-class top 400.
        image_mean, image_std: input normalisation, per RGB channel, of 0–1 images.
        extra_logits: logits per default box after the C + 1 that take part in the softmax but are never a
            detection (the 10 unused category slots of torchvision's COCO models); in training, classes that are
            never a target.
        class_topk: at most this many candidates per class before NMS (torchvision's top 400 per class);
            None: only ``pre_nms_topk``.
        resize_to: (H, W) every image is resized to, bilinearly after normalisation, with detections mapped
            back to its own pixels (and training boxes to the resized image): torchvision's fixed-size transform.
            None: the network sees the images as given.
        head_init_std: the prediction convs drawn from N(0, std²), biases 0 (torchvision's SSDLite: 0.03);
            None: PyTorch's default initialisation.
        batch_norm: ``eps`` and/or ``momentum`` set on every BatchNorm of the model, backbone included
            (torchvision's SSDLite: eps 0.001, momentum 0.03); None: each keeps its own.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, priors: Mapping | None = None,
                 separable_head: bool = False, iou_threshold: float = 0.5, neg_pos_ratio: float = 3.0,
                 variances: Sequence[float] = (0.1, 0.2), box_weight: float = 1.0, score_thresh: float = 0.01,
                 nms_thresh: float = 0.45, max_det: int = 200, pre_nms_topk: int | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 extra_logits: int = 0, class_topk: int | None = None,
                 resize_to: Sequence[int] | None = None, head_init_std: float | None = None,
                 batch_norm: Mapping | None = None, matcher: str = "iou", atss_topk: int = 9,
                 prior_size: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        # a key set to None is unset (a config that inherits ``scales`` can drop it with ``scales: null``)
        self.priors_config = {k: plain(v) for k, v in dict(priors or SSD300).items() if v is not None}
        num_boxes = boxes_per_cell(self.priors_config["aspect_ratios"])
        if len(num_boxes) != len(backbone.out_channels):
            raise ValueError(f"backbone gives {len(backbone.out_channels)} maps but the priors configure "
                             f"{len(num_boxes)} levels")
        if matcher not in MATCHERS:
            raise ValueError(f"matcher must be one of {MATCHERS}, got {matcher!r}")
        self.matcher, self.atss_topk, self.num_boxes = matcher, int(atss_topk), num_boxes
        self.backbone = backbone
        self.extra_logits = int(extra_logits)
        self.head = SSDHead(backbone.out_channels, num_boxes, num_classes + 1 + self.extra_logits, separable_head)
        if head_init_std is not None:
            normal_init(self.head, head_init_std)
        for module in self.modules() if batch_norm else ():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for key, value in dict(batch_norm).items():
                    if key not in ("eps", "momentum"):
                        raise ValueError(f"batch_norm sets eps and momentum, got {key!r}")
                    setattr(module, key, float(value))
        self.iou_threshold, self.neg_pos_ratio, self.box_weight = iou_threshold, neg_pos_ratio, box_weight
        self.variances = tuple(variances)
        self.coder = ssd_coder(self.variances)
        self.score_thresh, self.nms_thresh, self.max_det = score_thresh, nms_thresh, max_det
        self.pre_nms_topk = pre_nms_topk or 400 * num_classes
        self.class_topk = class_topk
        self.resize_to = tuple(plain(resize_to)) if resize_to is not None else None
        register_normalization(self, image_mean, image_std)
        self.prior_size = int(prior_size) if prior_size else None
        self._priors: dict[tuple, Tensor] = {}

    def default_boxes(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                      device: torch.device | str = "cpu") -> Tensor:
        """(A, 4) xyxy default boxes in input pixels for an input of ``image_size`` = (H, W) whose maps have
        ``feature_sizes``; cached per size and device."""
        key = (tuple(image_size), tuple(map(tuple, feature_sizes)), str(device))
        if key not in self._priors:
            fixed = self.prior_size if self.resize_to is None else None
            if "scales" in self.priors_config:
                boxes = ssd_relative_boxes(tuple(image_size), [tuple(f) for f in feature_sizes], **self.priors_config,
                                           prior_size=fixed)
            else:
                boxes = ssd_default_boxes(**ssd_prior_config(self.priors_config, tuple(image_size), feature_sizes,
                                                             fixed))
            self._priors[key] = boxes.to(device)
        return self._priors[key]

    def network_input(self, images: Tensor | Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """0–1 images → the normalised (B, 3, H', W') network input (resized to ``resize_to`` if set) and each
        image's own (H, W)."""
        if self.resize_to is None or isinstance(images, Tensor):
            x = stack_images(images)
            sizes = [tuple(x.shape[-2:])] * len(x)
            x = normalize(x, self.image_mean, self.image_std)
            return (x if self.resize_to is None else self._resize(x)), sizes
        sizes = [tuple(image.shape[-2:]) for image in images]
        return torch.cat([self._resize(normalize(image[None], self.image_mean, self.image_std))
                          for image in images]), sizes

    def _resize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == self.resize_to:
            return x
        return F.interpolate(x, size=self.resize_to, mode="bilinear", align_corners=False)

    @staticmethod
    def _box_scale(boxes: Tensor, source: Sequence[int], dest: Sequence[int]) -> Tensor:
        """(..., 4) xyxy boxes in pixels of a ``source`` = (H, W) image → pixels of the ``dest`` = (H, W) one."""
        (h, w), (dh, dw) = source, dest
        return boxes * boxes.new_tensor([dw / w, dh / h, dw / w, dh / h])

    def raw_outputs(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) 0–1 images → class logits (B, A, C + 1 + ``extra_logits``), offsets (B, A, 4), default
        boxes (A, 4) in network-input pixels (H, W, or ``resize_to``)."""
        return self._head_outputs(self.network_input(images)[0])

    def _head_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The normalised network input (B, 3, H, W) → :meth:`raw_outputs`."""
        logits, deltas, priors, _ = self._level_outputs(x)
        return logits, deltas, priors

    def _level_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """:meth:`_head_outputs` and the number of default boxes of each map."""
        maps = self.backbone(x)
        # Prediction convs and all that follows stay float32 under autocast: offsets are scaled by 10 and 5.
        with torch.autocast(x.device.type, enabled=False):
            logits, deltas = self.head([m.float() for m in maps])
        priors = self.default_boxes(x.shape[-2:], [m.shape[-2:] for m in maps], x.device)
        level_sizes = [m.shape[-2] * m.shape[-1] * k for m, k in zip(maps, self.num_boxes)]
        return logits, deltas, priors, level_sizes

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x, sizes = self.network_input(images)
        logits, deltas, priors, level_sizes = self._level_outputs(x)
        size = tuple(x.shape[-2:])
        if self.training:
            check_targets(targets, len(x))
            if self.resize_to is not None:
                targets = [dict(t, boxes=self._box_scale(t["boxes"], own, size)) for t, own in zip(targets, sizes)]
            return multibox_loss(logits, deltas, priors, targets, self.iou_threshold, self.neg_pos_ratio,
                                 self.variances, self.box_weight, self.matcher, level_sizes, self.atss_topk)
        detections = self.postprocess(logits, deltas, priors, size)
        for det, own in zip(detections, sizes):
            det["boxes"] = self._box_scale(det["boxes"], size, own) if own != size else det["boxes"]
        return detections

    def decode(self, logits: Tensor, deltas: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes (B, A, 4) xyxy input pixels and class probabilities (B, A, C): the softmax over all logits, the
        background column and the ``extra_logits`` dropped."""
        batch, num = deltas.shape[:2]
        boxes = self.coder.decode(deltas.reshape(-1, 4), priors.repeat(batch, 1)).view(batch, num, 4)
        return boxes, logits.softmax(dim=-1)[..., 1 : 1 + self.num_classes]

    def dense_predictions(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) 0–1 images → boxes (B, A, 4) xyxy pixels of ``images``, scores (B, A, C): the network and
        its decoding, before post-processing (what :mod:`detkit.deploy.onnx` exports)."""
        x, sizes = self.network_input(images)
        boxes, scores = self.decode(*self._head_outputs(x))
        return self._box_scale(boxes, x.shape[-2:], sizes[0]), scores

    def postprocess_settings(self) -> dict:
        """Keyword arguments of :func:`~detkit.postprocess.postprocess_detections` that eval mode applies."""
        return dict(score_threshold=self.score_thresh, nms_threshold=self.nms_thresh, max_detections=self.max_det,
                    method="nms", pre_nms_topk=self.pre_nms_topk, class_topk=self.class_topk)

    @torch.no_grad()
    def postprocess(self, logits: Tensor, deltas: Tensor, priors: Tensor, size: Sequence[int]) -> list[dict]:
        """Decode offsets, softmax, drop the background column, then per-class threshold, NMS and top
        ``max_det`` (:func:`~detkit.postprocess.postprocess_detections`), boxes clipped to ``size`` = (H, W)."""
        boxes, scores = self.decode(logits, deltas, priors)
        return postprocess_detections(boxes, scores, image_size=tuple(size), **self.postprocess_settings())
