"""YOLO family detectors with anchors: YOLOv2, YOLOv3, YOLOv3-SPP and YOLOv4 are one class, configured.

YOLOv3 (Redmon & Farhadi, 2018): a Darknet backbone, a top-down neck over three scales, and per scale a
head predicting, for each of its anchors, (tx, ty, tw, th, objectness, C class logits). Boxes follow
YOLOv2's direct location prediction, b_xy = (σ(t_xy) + c_xy) · stride and b_wh = p_wh · e^{t_wh}; classes
are independent sigmoids trained with BCE.

The other versions swap pieces (see ``configs/model/yolo*.yaml``): YOLOv2 a Darknet-19 backbone and the
:class:`~detkit.models.necks.passthrough.Passthrough` neck (one level, 5 anchors, ``xy_scale=1``); YOLOv3-SPP
adds ``spp``; YOLOv4 a CSPDarknet53 backbone with Mish, ``spp``, the :class:`~detkit.models.necks.pan.PANet`
neck, CIoU, ``xy_scale`` > 1 and DIoU-NMS, with optional label smoothing, SAM and DropBlock. Darknet's tiny
models (``yolov2_tiny``, ``yolov3_tiny``, ``yolov4_tiny``) use :mod:`detkit.models.backbones.darknet_tiny` and
:mod:`detkit.models.necks.tiny` with ``head_channels``, and yolov2-tiny ``class_softmax``. YOLOv1 has no
anchors and lives in :mod:`detkit.models.detectors.yolov1`. YOLO9000's hierarchical classes and joint
detection + classification training are the ``wordtree`` option (``configs/model/yolov2_wordtree_cpu.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from detkit.errors import ConfigError
from detkit.losses.yolo import YOLOLoss
from detkit.models.detectors.common import check_targets, plain, stack_images
from detkit.models.layers import ConvBNAct, DropBlock2d, SpatialAttention
from detkit.models.necks.spp import SPPBlock
from detkit.models.necks.yolo_fpn import YOLOv3Neck
from detkit.postprocess import postprocess_detections
from detkit.wordtree import WordTree

NMS_METHODS = ("nms", "diou")

# e^t is clamped so that an untrained head cannot produce inf boxes: e^4 ≈ 55 × the anchor.
_MAX_LOG_SCALE = 4.0


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
        neck_pairs: (3×3, 1×1) pairs per conv set (2 in the paper), or per level (shallowest first).
        neck: None for :class:`YOLOv3Neck`, else a factory (Hydra ``_partial_: true``) called with
            ``in_channels``, ``channels`` and ``act`` that returns a module with ``out_channels``; a neck
            returning fewer levels than the backbone gives the deepest ones (YOLOv2's single level).
        spp: put :class:`~detkit.models.necks.spp.SPPBlock` (pools ``spp_kernels``, ``spp_pairs`` conv pairs
            before them) on the deepest backbone map.
        sam: YOLOv4's point-wise spatial attention on each neck output. dropblock: DropBlock probability on
            each neck output in training (0: off), blocks of ``dropblock_size``.
        box_loss, loss_weights, level_weights, ratio_thresh, neighbor_cells, focal, focal_gamma, focal_alpha,
            label_smoothing, ignore_thresh: see :class:`detkit.losses.yolo.YOLOLoss`; ``neighbor_cells`` needs
            ``xy_scale`` ≥ 2.
        xy_scale: YOLOv4's grid-sensitivity fix, b_xy = (s·σ(t) − (s − 1)/2 + c) · stride; 1 is YOLOv3's
            coding, where a centre on a cell border needs σ(t) → 0 or 1 (infinite logits). One s for every
            level, or one per level, shallowest first (yolov4.cfg's ``scale_x_y``: 1.2, 1.1, 1.05 at strides
            8, 16, 32); kept as ``self.xy_scale``, a tuple with one value per level.
        score_thresh, nms_thresh, max_det, pre_nms_topk: inference post-processing; ``nms`` is ``nms``
            (greedy IoU) or ``diou`` (DIoU-NMS, YOLOv4).
        head_channels: per level (shallowest first), the width of the head's 3×3 conv; None: twice the neck's
            (darknet's tiny models differ, e.g. yolov3-tiny's 384-channel concatenation into a 256-wide conv).
        class_softmax: inference scores σ(objectness)·softmax(classes), as darknet's ``[region]`` layer
            (yolov2, yolov2-tiny) scores, instead of σ(objectness)·σ(class); training then uses a softmax
            cross-entropy class loss instead of BCE.
        wordtree: YOLO9000's hierarchical classes, ``{parents: [...]}``: class ``i``'s parent class index, −1 for
            a root, one entry per class (internal nodes are classes too; :class:`~detkit.wordtree.WordTree`).
            Classes become one softmax per sibling set, trained with the tree cross-entropy; each box reports
            the node :meth:`~detkit.wordtree.WordTree.walk_down` reaches with ``wordtree_thresh`` (darknet's
            ``hier_thresh``, 0.5), scored σ(objectness)·P(node) (the node's path product), every other class
            scoring 0. Replaces ``class_softmax``.
        class_only_objectness: joint training's objectness target for the prediction chosen in a
            classification image (a target with ``image_label`` and no boxes): see
            :class:`~detkit.losses.yolo.YOLOLoss`; None: no objectness term for classification images.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module,
        anchors: Sequence[Sequence[Sequence[float]]],
        neck_channels: Sequence[int] | None = None,
        neck_pairs: int | Sequence[int] = 2,
        act: str = "leaky",
        box_loss: str = "ciou",
        loss_weights: dict | None = None,
        level_weights: Sequence[float] = (4.0, 1.0, 0.4),
        ratio_thresh: float = 4.0,
        xy_scale: float | Sequence[float] = 1.0,
        neighbor_cells: bool = False,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.6,
        max_det: int = 300,
        pre_nms_topk: int = 3000,
        neck: Callable[..., nn.Module] | None = None,
        spp: bool = False,
        spp_kernels: Sequence[int] = (5, 9, 13),
        spp_pairs: int = 0,
        sam: bool = False,
        dropblock: float = 0.0,
        dropblock_size: int = 3,
        focal: bool = False,
        focal_gamma: float = 1.5,
        focal_alpha: float | None = 0.25,
        label_smoothing: float = 0.0,
        ignore_thresh: float | None = None,
        nms: str = "nms",
        head_channels: Sequence[int] | None = None,
        class_softmax: bool = False,
        wordtree: dict | None = None,
        wordtree_thresh: float = 0.5,
        class_only_objectness: float | None = 0.3,
    ) -> None:
        super().__init__()
        if nms not in NMS_METHODS:
            raise ValueError(f"unknown nms {nms!r}; expected one of {', '.join(NMS_METHODS)}")
        if len({len(a) for a in anchors}) != 1:
            raise ValueError("every level needs the same number of anchors")
        self.num_classes = num_classes
        self.wordtree = self._build_wordtree(wordtree, num_classes, class_softmax, label_smoothing)
        self.wordtree_thresh = wordtree_thresh
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        num_anchors = self.anchors.shape[1]
        in_channels = list(backbone.out_channels)
        channels = list(neck_channels) if neck_channels else [c // 2 for c in in_channels]
        self.backbone = backbone
        # Created only when asked for, so that models without them keep their parameters (and seeded init).
        self.spp = SPPBlock(in_channels[-1], spp_kernels, act, spp_pairs) if spp else None
        if self.spp is not None:
            in_channels[-1] = self.spp.out_channels
        if neck is None:
            self.neck = YOLOv3Neck(in_channels, channels, neck_pairs, act)
        else:
            self.neck = neck(in_channels=in_channels, channels=channels, act=act)
        channels = list(self.neck.out_channels)
        strides = list(backbone.strides)[len(backbone.strides) - len(channels):]
        if len(anchors) != len(strides) or len(level_weights) != len(strides):
            raise ValueError(
                f"backbone and neck give {len(strides)} levels but {len(anchors)} anchor sets and "
                f"{len(level_weights)} level weights were configured"
            )
        self.strides = strides
        hidden = list(head_channels) if head_channels else [2 * c for c in channels]
        if len(hidden) != len(channels):
            raise ValueError(f"{len(hidden)} head_channels for {len(channels)} levels")
        self.heads = nn.ModuleList(
            nn.Sequential(ConvBNAct(c, h, 3, act=act), nn.Conv2d(h, num_anchors * (5 + num_classes), 1))
            for c, h in zip(channels, hidden)
        )
        self.sam = nn.ModuleList(SpatialAttention(c) for c in channels) if sam else None
        self.dropblock = DropBlock2d(dropblock, dropblock_size) if dropblock > 0 else None
        self.loss = YOLOLoss(num_classes, box_loss, **(loss_weights or {}), level_weights=level_weights,
                             ratio_thresh=ratio_thresh, neighbor_cells=neighbor_cells, focal=focal,
                             focal_gamma=focal_gamma, focal_alpha=focal_alpha, label_smoothing=label_smoothing,
                             ignore_thresh=ignore_thresh, class_softmax=class_softmax, wordtree=self.wordtree,
                             class_only_objectness=class_only_objectness)
        scales = [float(xy_scale)] * len(strides) if isinstance(xy_scale, (int, float)) else list(xy_scale)
        if len(scales) != len(strides):
            raise ConfigError(f"model.xy_scale has {len(scales)} values for {len(strides)} levels: give one value, "
                              "or one per level (shallowest first)")
        if neighbor_cells and min(scales) < 2.0:
            raise ValueError("neighbor_cells needs xy_scale >= 2 so a neighbouring cell can reach the centre")
        self.xy_scale = tuple(float(s) for s in scales)
        self.class_softmax = class_softmax
        self.nms = nms
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.max_det, self.pre_nms_topk = max_det, pre_nms_topk
        self._init_head_bias()

    @staticmethod
    def _build_wordtree(wordtree: dict | None, num_classes: int, class_softmax: bool, label_smoothing: float
                        ) -> WordTree | None:
        if wordtree is None:
            return None
        if "parents" not in wordtree or set(wordtree) - {"parents"}:
            raise ConfigError(f"model.wordtree must be {{parents: [...]}}, got keys {sorted(wordtree)}")
        if class_softmax or label_smoothing:
            raise ConfigError("model.wordtree replaces class_softmax and takes no label_smoothing: set "
                              "model.class_softmax=false and model.label_smoothing=0")
        tree = WordTree(plain(wordtree["parents"]))
        if tree.num_classes != num_classes:
            raise ConfigError(f"model.wordtree.parents has {tree.num_classes} entries for {num_classes} classes: "
                              "one per class of the dataset, internal nodes included")
        return tree

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
        features = self.backbone(images)
        if self.spp is not None:
            features = [*features[:-1], self.spp(features[-1])]
        outputs = []
        for level, (head, feature) in enumerate(zip(self.heads, self.neck(features))):
            if self.sam is not None:
                feature = self.sam[level](feature)
            if self.dropblock is not None:
                feature = self.dropblock(feature)
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
        for out, anchors, stride, scale in zip(outputs, self.anchors, self.strides, self.xy_scale):
            _, _, h, w, _ = out.shape
            ys, xs = torch.meshgrid(
                torch.arange(h, device=out.device), torch.arange(w, device=out.device), indexing="ij"
            )
            grid = torch.stack([xs, ys], dim=-1).to(out.dtype)
            xy = (scale * out[..., :2].sigmoid() - (scale - 1) / 2 + grid) * stride
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
            check_targets(targets, len(x))
            return self.loss(outputs, boxes, targets, self.anchors, self.strides)
        return self.postprocess(outputs, boxes, x.shape[-2:])

    def _dense(self, outputs: Sequence[Tensor], boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        batch = outputs[0].shape[0]
        all_boxes = torch.cat([b.reshape(batch, -1, 4) for b in boxes], dim=1)
        raw = torch.cat([o.reshape(batch, -1, 5 + self.num_classes) for o in outputs], dim=1)
        if self.wordtree is not None:
            node, prob = self.wordtree.walk_down(raw[..., 5:], self.wordtree_thresh)
            classes = torch.zeros_like(raw[..., 5:]).scatter_(-1, node[..., None], prob[..., None].to(raw.dtype))
        else:
            classes = raw[..., 5:].softmax(dim=-1) if self.class_softmax else raw[..., 5:].sigmoid()
        return all_boxes, raw[..., 4:5].sigmoid() * classes

    def dense_predictions(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Every anchor's box (B, N, 4) xyxy input pixels and class scores (B, N, C) = σ(objectness)·σ(class)
        (softmax over classes with ``class_softmax``; with ``wordtree`` the walked-down node's path product, 0 for
        the other classes): what post-processing starts from, and what an exported
        graph returns (:mod:`detkit.deploy.onnx`)."""
        outputs = self.raw_outputs(stack_images(images))
        return self._dense(outputs, self.decode(outputs))

    def postprocess_settings(self) -> dict:
        """:func:`detkit.postprocess.postprocess_detections` arguments that reproduce :meth:`postprocess`."""
        return {"score_threshold": self.score_thresh, "nms_threshold": self.nms_thresh,
                "max_detections": self.max_det, "pre_nms_topk": self.pre_nms_topk, "method": self.nms}

    @torch.no_grad()
    def postprocess(self, outputs: Sequence[Tensor], boxes: Sequence[Tensor], size: Sequence[int]) -> list[dict]:
        """Score = σ(objectness)·σ(class) (softmax over classes with ``class_softmax``, one walked-down node per
        box with ``wordtree``); threshold, top-k,
        class-aware NMS (``self.nms``), clip to the input: :func:`~detkit.postprocess.postprocess_detections`
        with :meth:`postprocess_settings`."""
        all_boxes, scores = self._dense(outputs, boxes)
        return postprocess_detections(all_boxes, scores, image_size=tuple(size), **self.postprocess_settings())
