"""torchvision's SSD300-VGG16 and ImageNet backbones into detkit.

``ssd300_vgg16`` (``SSD300_VGG16_Weights.COCO_V1`` or a state dict file of that model: 91 class outputs, the
background then COCO's category ids 1–90, 10 of which no image uses) becomes a ``model=ssd300`` checkpoint
with COCO's 80 classes whose detections are torchvision's. Layer for layer the networks are the same; what
differs at inference is set in the converted config (:data:`TORCHVISION_SSD300`): default boxes as fractions
of the input (scales 0.07 … 1.05, fixed steps, sides clamped to the image), 0–255 input with the Caffe VGG's
mean, a fixed 300×300 bilinear resize, softmax over all 91 outputs (the 10 unused ones stay as
``extra_logits``), and the top 400 candidates per class before NMS. Offsets are decoded with variances (0.1,
0.2) = torchvision's BoxCoder weights (10, 10, 5, 5), clamped at log(1000/16) like torchvision's.

Backbones: the ``features`` of torchvision's ``vgg16`` (``VGG16_Weights.IMAGENET1K_V1`` or
``IMAGENET1K_FEATURES``), ``mobilenet_v2``, ``mobilenet_v3_large`` and ``mobilenet_v3_small`` classifiers
are written as a file of their ``features.*`` entries, checked against the architecture, that detkit's
backbones read through ``backbone.pretrained=`` (VGG16SSD, VGG16Conv5, MobileNetV2SSD, light.MobileNetV2,
light.MobileNetV3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from detkit.convert.coco import COCO80_IDS
from detkit.convert.darknet import ConvertError
from detkit.convert.pretrained import is_weights_name, load_prefixed, load_state_dict
from detkit.engine.checkpoint import atomic_write

__all__ = ["TORCHVISION_SSD300", "TV_COCO_COLUMNS", "BACKBONES", "torchvision_ssd300_values", "ssd300_state_dict",
           "convert_torchvision_ssd", "convert_backbone", "weights_normalization"]

# The order of torchvision's 91 class outputs in the detkit head: background, COCO's 80 (detkit labels 0–79,
# COCO80_IDS order), then the 10 unused slots, which only enter the softmax.
_UNUSED = tuple(i for i in range(1, 91) if i not in COCO80_IDS)
TV_COCO_COLUMNS = (0, *COCO80_IDS, *_UNUSED)

# torchvision's ssd300_vgg16 at inference, as values of a detkit ssd300 config.
TORCHVISION_SSD300 = {
    "model.priors": {"scales": [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], "steps": [8, 16, 32, 64, 100, 300],
                     "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]], "clip": True},
    "model.image_mean": [0.48235, 0.45882, 0.40784],
    "model.image_std": [1.0 / 255.0] * 3,
    "model.variances": [0.1, 0.2],
    "model.extra_logits": len(_UNUSED),
    "model.class_topk": 400,
    "model.pre_nms_topk": None,
    "model.score_thresh": 0.01,
    "model.nms_thresh": 0.45,
    "model.max_det": 200,
    "model.resize_to": [300, 300],
    "data.resize": "stretch",  # torchvision resizes any image to 300 x 300, ignoring its aspect ratio
}

_CONV5 = 23  # torchvision's extra.0 starts at VGG16 features index 23 (pool4), detkit's features go on to 29

# torchvision key → detkit key, the first pattern that matches; None: not an SSD300-VGG16 key.
_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"backbone\.features\.(\d+)\.(weight|bias)", lambda m: f"backbone.features.{m[1]}.{m[2]}"),
    (r"backbone\.scale_weight", lambda m: "backbone.l2norm.weight"),
    (r"backbone\.extra\.0\.7\.(\d+)\.(weight|bias)", lambda m: f"backbone.fc.{m[1]}.{m[2]}"),
    (r"backbone\.extra\.0\.(\d)\.(weight|bias)", lambda m: f"backbone.features.{_CONV5 + int(m[1])}.{m[2]}"),
    (r"backbone\.extra\.([1-4])\.(\d+)\.(weight|bias)", lambda m: f"backbone.extras.{int(m[1]) - 1}.{m[2]}.{m[3]}"),
    (r"head\.classification_head\.module_list\.(\d+)\.(weight|bias)", lambda m: f"head.cls.{m[1]}.{m[2]}"),
    (r"head\.regression_head\.module_list\.(\d+)\.(weight|bias)", lambda m: f"head.box.{m[1]}.{m[2]}"),
]


def torchvision_ssd300_values(size: int = 300) -> dict:
    """:data:`TORCHVISION_SSD300` with the fixed input ``size`` (torchvision's is 300)."""
    return dict(TORCHVISION_SSD300, **{"model.resize_to": [size, size]})


def _detkit_key(key: str) -> str | None:
    for pattern, rename in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return None


def _class_rows(tensor: Tensor, key: str) -> Tensor:
    """A classification conv's (k·91, …) weight or bias with each box's 91 rows in :data:`TV_COCO_COLUMNS`
    order."""
    width = len(TV_COCO_COLUMNS)
    if tensor.shape[0] % width:
        raise ConvertError(f"{key}: {tensor.shape[0]} outputs, not a multiple of torchvision's 91 COCO classes "
                           "(a model trained on other classes)")
    rows = tensor.reshape(-1, width, *tensor.shape[1:])[:, list(TV_COCO_COLUMNS)]
    return rows.reshape(tensor.shape)


def ssd300_state_dict(state: Mapping[str, Tensor], model: nn.Module, source: str = "the state dict") -> dict:
    """torchvision ``ssd300_vgg16`` ``state`` (COCO's 91 outputs) → the state dict of ``model``, a detkit SSD300
    with 80 classes and 10 ``extra_logits``. Every entry is used and every entry of ``model`` given, with its
    shape; otherwise a :class:`~detkit.convert.darknet.ConvertError` naming ``source`` and the keys."""
    own = model.state_dict()
    out, unknown = {}, []
    for key, value in state.items():
        target = _detkit_key(key)
        if target is None or target not in own:
            unknown.append(key)
            continue
        out[target] = _class_rows(value, key) if ".classification_head." in key else value
    missing = [k for k in own if k not in out]
    if unknown or missing:
        parts = ([f"entries of no SSD300-VGG16 layer: {', '.join(unknown[:4])}"] if unknown else []) + \
                ([f"no value for {', '.join(missing[:4])}"] if missing else [])
        raise ConvertError(f"{source}: not torchvision's ssd300_vgg16 ({'; '.join(parts)})")
    wrong = [f"{k} {tuple(v.shape)} for {tuple(own[k].shape)}" for k, v in out.items() if v.shape != own[k].shape]
    if wrong:
        raise ConvertError(f"{source}: shapes differ from detkit's SSD300 ({', '.join(wrong[:4])})")
    return out


def convert_torchvision_ssd(weights: str | Path, out: str | Path, size: int = 300) -> Path:
    """torchvision ``ssd300_vgg16`` weights (a state dict file, or ``SSD300_VGG16_Weights.COCO_V1`` resolved by
    torchvision) → a detkit ``model=ssd300`` checkpoint with COCO's 80 classes that computes torchvision's
    detections at the fixed input ``size`` (also the evaluation size)."""
    from detkit.convert.checkpoint import build_converted, converted_config, save_converted

    state = load_state_dict(weights)
    config = converted_config("ssd300", size, values=torchvision_ssd300_values(size))
    detector = build_converted(config, len(COCO80_IDS))
    detector.load_state_dict(ssd300_state_dict(state, detector, str(weights)))
    source = {"format": "torchvision", "model": "ssd300_vgg16", "file": str(weights)}
    return save_converted(detector, config, out, source)


def _vgg16_features() -> nn.Sequential:
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])  # vgg16().features without building the 120M-parameter classifier


def _features(builder: Callable[..., nn.Module]) -> Callable[[], nn.Module]:
    return lambda: builder(weights=None).features


def _backbones() -> dict[str, Callable[[], nn.Module]]:
    from torchvision.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small

    return {"vgg16": _vgg16_features, "mobilenet_v2": _features(mobilenet_v2),
            "mobilenet_v3_large": _features(mobilenet_v3_large), "mobilenet_v3_small": _features(mobilenet_v3_small)}


BACKBONES = ("vgg16", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")


def convert_backbone(weights: str | Path, arch: str, out: str | Path) -> Path:
    """The ``features.*`` entries of a torchvision ``arch`` classifier (one of :data:`BACKBONES`; a state dict
    file or a weights name such as ``VGG16_Weights.IMAGENET1K_FEATURES``), checked against the architecture,
    written to ``out``: a file for ``backbone.pretrained=``. The classifier is left out (IMAGENET1K_FEATURES's
    holds NaN)."""
    if arch not in BACKBONES:
        raise ConvertError(f"backbone must be one of {', '.join(BACKBONES)}, got {arch!r}")
    features = _backbones()[arch]()
    load_prefixed(features, weights)
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    return atomic_write(out, lambda f: torch.save(state, f))


def weights_normalization(weights: str | Path) -> tuple[list[float], list[float]] | None:
    """(mean, std) of 0–1 RGB input that torchvision's weights name ``weights`` was trained with, when its
    transforms state one (``VGG16_Weights.IMAGENET1K_FEATURES``: 0–255 input, the Caffe VGG's mean); None for a
    file or a name without one."""
    if Path(weights).is_file() or not is_weights_name(str(weights)):
        return None
    from torchvision.models import get_weight

    keywords = getattr(get_weight(str(weights)).transforms, "keywords", {})
    if "mean" not in keywords or "std" not in keywords:
        return None
    return list(keywords["mean"]), list(keywords["std"])
