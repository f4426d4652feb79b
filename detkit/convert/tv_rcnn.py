"""torchvision's ResNet-50 FPN detectors into detkit: ``fasterrcnn_resnet50_fpn`` → ``model=fpn_rcnn`` and
``retinanet_resnet50_fpn`` → ``model=retinanet`` (their COCO_V1 weights, 91 outputs: 0 background, 1–90 COCO's
category ids, ten of them N/A), and ImageNet ``resnetXX`` classification state dicts → detkit's ResNet backbone.

State-dict keys, torchvision → detkit (older torchvision files name some convs without the
``Conv2dNormActivation`` wrapper: ``rpn.head.conv.weight``, ``fpn.inner_blocks.0.weight``, RetinaNet's
``conv.{2i}``; both spellings are read):

- ``backbone.body.conv1`` / ``bn1`` / ``layerN`` → ``backbone.stem.0`` / ``stem.1`` / ``stages.{N-1}``
- ``backbone.fpn.*`` → ``neck.fpn.*`` (detkit's FPN wraps torchvision's ``FeaturePyramidNetwork``)
- ``rpn.head.conv.0.0`` → ``rpn.head.conv.0``; ``rpn.head.cls_logits`` / ``bbox_pred`` unchanged
- ``roi_heads.box_head.fc6`` / ``fc7`` → ``roi_head.fc6`` / ``fc7``
- ``roi_heads.box_predictor.cls_score`` → ``roi_head.cls_score``: the rows of COCO's 80 classes (ids
  :data:`~detkit.convert.coco.COCO80_IDS`, detkit's labels 0–79), then background and the 10 N/A rows, which
  the head merges into one background logit (``background_logits: 11``), so its softmax is torchvision's
  91-way softmax; ``bbox_pred``: the 80 classes' 4 rows each, then background's 4
- ``head.classification_head.conv.{i}.0`` → ``head.cls_subnet.{2i}``; ``cls_logits`` → ``head.cls_logits``,
  per anchor the 80 classes' channels (background and N/A channels dropped: sigmoid scores are per class);
  ``head.regression_head.conv.{i}.0`` / ``bbox_reg`` → ``head.box_subnet.{2i}`` / ``head.bbox_pred``

The converted config (:data:`CONVERTED_VALUES`) sets what torchvision computes differently from detkit's
defaults: frozen BatchNorm with ε 0 (``overwrite_eps(model, 0.0)`` of the COCO_V1 builders), the first two
ResNet stages frozen, torchvision's anchor layout (:func:`~detkit.anchors.torchvision_anchors`), Faster R-CNN's
box-head postprocess (no top-k before NMS, detections narrower than 0.01 px dropped), RetinaNet's P6 from P5,
truncated anchor sizes and 300 detections, and the training losses' smooth-L1 β (1/9; RetinaNet's L1).
torchvision resizes images (shorter side 800, longer at most 1333); detkit's tools letterbox them to
``img_size``: the networks and postprocessing are the same, the input pixels are those of each tool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from detkit.convert.checkpoint import build_converted, converted_config, save_converted
from detkit.convert.coco import COCO80_IDS, COCO80_NAMES
from detkit.convert.darknet import ConvertError
from detkit.convert.pretrained import load_state_dict

__all__ = ["TORCHVISION_MODELS", "CONVERTED_VALUES", "TORCHVISION_CLASSES", "resnet_state", "fasterrcnn_state",
           "retinanet_state", "detector_kind", "convert_torchvision"]

# detkit model config → the torchvision builder whose weights it takes.
TORCHVISION_MODELS = {"fpn_rcnn": "fasterrcnn_resnet50_fpn", "retinanet": "retinanet_resnet50_fpn"}
TORCHVISION_CLASSES = 91  # torchvision's COCO outputs: background (0) and category ids 1–90
RETINANET_ANCHORS = 9  # 3 sizes × 3 ratios per location
_BACKGROUND_ROWS = [0] + [i for i in range(1, TORCHVISION_CLASSES) if i not in COCO80_IDS]  # 0 and the 10 N/A
_DETECTORS = {"fpn_rcnn": "FPNRCNN", "retinanet": "RetinaNet"}  # kind → detkit class


def _retinanet_anchor_sizes() -> list[list[int]]:
    # torchvision's _default_anchorgen: x, int(x·2^(1/3)), int(x·2^(2/3)), truncated
    return [[x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))] for x in (32, 64, 128, 256, 512)]


# torchvision's GeneralizedRCNNTransform: the shorter side to min_size (800), the longer at most max_size (1333),
# bilinear; images of a batch padded at the bottom and right (detkit's data.resize=shorter_side).
MIN_SIZE, MAX_SIZE = 800, 1333
_BACKBONE = {"model.bn_eps": 0.0, "model.backbone.frozen_bn": True, "model.backbone.trainable_layers": 3,
             "data.resize": "shorter_side", "data.max_size": MAX_SIZE}
CONVERTED_VALUES = {
    "fpn_rcnn": {**_BACKBONE, "model.rpn.anchor_layout": "torchvision", "model.rpn.pre_nms_topk.test": 1000,
                 "model.rpn.post_nms_topk.test": 1000, "model.rpn.nms_threshold": 0.7, "model.rpn.min_size": 1e-3,
                 "model.background_box": True, "model.background_logits": len(_BACKGROUND_ROWS),
                 "model.score_thresh": 0.05, "model.nms_thresh": 0.5, "model.max_det": 100,
                 "model.det_pre_nms_topk": None, "model.det_min_size": 1e-2, "model.box_beta": 1 / 9},
    "retinanet": {**_BACKBONE, "model.p6_from": "p5", "model.num_convs": 4, "model.head_norm": "none",
                  "model.anchor_layout": "torchvision", "model.anchor_sizes": _retinanet_anchor_sizes(),
                  "model.anchor_scales": None, "model.ratios": [0.5, 1.0, 2.0], "model.score_thresh": 0.05,
                  "model.topk_per_level": 1000, "model.nms_thresh": 0.5, "model.max_det": 300,
                  "model.box_beta": 0.0},
}


def resnet_state(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """A torchvision ``resnetXX`` state dict (keys under ``prefix``; ``fc.*`` ignored) → detkit
    :class:`~detkit.models.backbones.resnet.ResNet` keys (``stem.0``, ``stem.1``, ``stages.0``–``3``)."""
    renamed = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        head, _, rest = key[len(prefix):].partition(".")
        if head in ("conv1", "bn1"):
            renamed[f"stem.{0 if head == 'conv1' else 1}.{rest}"] = value
        elif re.fullmatch(r"layer[1-4]", head):
            renamed[f"stages.{int(head[5:]) - 1}.{rest}"] = value
        elif head != "fc":
            raise ConvertError(f"{key}: not a key of torchvision's ResNet (conv1, bn1, layer1–4, fc)")
    return renamed


def _fpn_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.fpn."):
            rest = re.sub(r"^(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$", r"\1.\2.0.\3",
                          key[len("backbone.fpn."):])
            out[f"neck.fpn.{rest}"] = value
    return out


def _check_classes(state: dict[str, Tensor], key: str, per_anchor: int = 1) -> None:
    rows = state[key].shape[0]
    if rows != per_anchor * TORCHVISION_CLASSES:
        raise ConvertError(f"{key} has {rows} rows, not {per_anchor} × {TORCHVISION_CLASSES} (background and COCO "
                           "ids 1–90): only torchvision's COCO class layout converts")


def fasterrcnn_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fasterrcnn_resnet50_fpn``'s 91-way state dict → detkit ``FPNRCNN`` keys for COCO's 80 classes, with
    ``background_box`` and ``background_logits`` 11 (the module docstring gives the mapping)."""
    _check_classes(state, "roi_heads.box_predictor.cls_score.weight")
    out = {f"backbone.{k}": v for k, v in resnet_state(state, "backbone.body.").items()}
    out.update(_fpn_state(state))
    for key, value in state.items():
        if key.startswith("rpn.head."):
            rest = re.sub(r"^conv\.(0\.0\.)?(weight|bias)$", r"conv.0.\2", key[len("rpn.head."):])
            out[f"rpn.head.{rest}"] = value
        elif key.startswith("roi_heads.box_head."):
            out[f"roi_head.{key[len('roi_heads.box_head.'):]}"] = value
    rows = torch.tensor([*COCO80_IDS, *_BACKGROUND_ROWS])
    box_rows = torch.tensor([4 * c + j for c in (*COCO80_IDS, 0) for j in range(4)])
    for name in ("weight", "bias"):
        out[f"roi_head.cls_score.{name}"] = state[f"roi_heads.box_predictor.cls_score.{name}"][rows]
        out[f"roi_head.bbox_pred.{name}"] = state[f"roi_heads.box_predictor.bbox_pred.{name}"][box_rows]
    return out


def _subnet(state: dict[str, Tensor], source: str, target: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(source):
            continue
        rest = key[len(source):]
        new = re.fullmatch(r"conv\.(\d)\.0\.(weight|bias)", rest)
        old = re.fullmatch(r"conv\.(\d)\.(weight|bias)", rest)
        if new:
            out[f"{target}.{2 * int(new[1])}.{new[2]}"] = value
        elif old:  # torchvision before Conv2dNormActivation: conv.0, conv.2, … between ReLUs, detkit's order
            out[f"{target}.{old[1]}.{old[2]}"] = value
    return out


def retinanet_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``retinanet_resnet50_fpn``'s 91-way state dict → detkit ``RetinaNet`` keys for COCO's 80 classes: per
    anchor, the class-logit channels of COCO80_IDS (background and N/A channels dropped)."""
    _check_classes(state, "head.classification_head.cls_logits.weight", RETINANET_ANCHORS)
    out = {f"backbone.{k}": v for k, v in resnet_state(state, "backbone.body.").items()}
    out.update(_fpn_state(state))
    out.update(_subnet(state, "head.classification_head.", "head.cls_subnet"))
    out.update(_subnet(state, "head.regression_head.", "head.box_subnet"))
    channels = torch.tensor([a * TORCHVISION_CLASSES + c for a in range(RETINANET_ANCHORS) for c in COCO80_IDS])
    for name in ("weight", "bias"):
        out[f"head.cls_logits.{name}"] = state[f"head.classification_head.cls_logits.{name}"][channels]
        out[f"head.bbox_pred.{name}"] = state[f"head.regression_head.bbox_reg.{name}"]
    return out


def detector_kind(state: dict[str, Tensor], source: str = "state dict") -> str:
    """``fpn_rcnn`` for a ``fasterrcnn_resnet50_fpn`` state dict, ``retinanet`` for ``retinanet_resnet50_fpn``;
    a :class:`~detkit.convert.darknet.ConvertError` naming ``source`` otherwise."""
    if "roi_heads.box_predictor.cls_score.weight" in state and "rpn.head.cls_logits.weight" in state:
        return "fpn_rcnn"
    if "head.classification_head.cls_logits.weight" in state:
        return "retinanet"
    raise ConvertError(f"{source}: neither torchvision's fasterrcnn_resnet50_fpn nor retinanet_resnet50_fpn "
                       f"(its keys start {sorted(state)[:3]})")


_MAPPINGS = {"fpn_rcnn": fasterrcnn_state, "retinanet": retinanet_state}


def _load(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = [f"missing {result.missing_keys[:3]}" if result.missing_keys else "",
                f"left over {result.unexpected_keys[:3]}" if result.unexpected_keys else ""]
    if any(problems):
        raise ConvertError(f"{source} does not fit the detkit model: " + ", ".join(p for p in problems if p))


def convert_torchvision(weights: str | Path, out: str | Path, model: str | DictConfig = "fpn_rcnn",
                        img_size: int = 800, overrides: Sequence[str] = ()) -> Path:
    """A torchvision ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` state dict (a local file or a
    weights name such as ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``, :func:`~detkit.convert.pretrained.
    load_state_dict`) → a detkit checkpoint of ``model`` (``fpn_rcnn`` / ``retinanet`` or their composed
    config) with COCO's 80 classes, evaluated at ``img_size``, with :data:`CONVERTED_VALUES` in its config."""
    state = load_state_dict(weights)
    kind = detector_kind(state, str(weights))
    config = converted_config(model, img_size, overrides, CONVERTED_VALUES[kind])
    target = str(config["model"].get("_target_", ""))
    if not target.endswith("." + _DETECTORS[kind]):
        raise ConvertError(f"{weights} holds torchvision's {TORCHVISION_MODELS[kind]}: convert it with "
                           f"model={kind}, not a {target.rpartition('.')[2] or 'model'}")
    detector = build_converted(config, len(COCO80_NAMES))
    _load(detector, _MAPPINGS[kind](state), str(weights))
    source = {"format": "torchvision", "model": TORCHVISION_MODELS[kind], "file": str(weights)}
    return save_converted(detector, config, out, source, COCO80_NAMES)
