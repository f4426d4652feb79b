"""Published weights → detkit checkpoints that every tool loads (``tools/eval.py checkpoint=``, ``predict.py``,
``export.py``, ``train.py weights=`` for fine-tuning, ``detkit.load``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from detkit.convert.coco import COCO80_NAMES
from detkit.data.voc import VOC_CLASSES
from detkit.engine.checkpoint import save_checkpoint

# The classes of published darknet files that are not COCO's 80, by configs/model name: yolov1.weights is VOC's.
PUBLISHED_CLASS_NAMES = {"yolov1_darknet": VOC_CLASSES}


# How published darknet models take their input when it is not darknet's letterbox, by configs/model name:
# darknet's YOLOv1 resizes the image to 448 x 448 (resize_image), ignoring its aspect ratio.
PUBLISHED_INPUT = {"yolov1_darknet": ["data.resize=stretch"]}


def published_class_names(model: str) -> tuple[str, ...]:
    """The class names of the published weights of the configs/model ``model``: COCO's 80 unless
    :data:`PUBLISHED_CLASS_NAMES` says otherwise."""
    return tuple(PUBLISHED_CLASS_NAMES.get(model, COCO80_NAMES))


def published_input(model: str) -> list[str]:
    """Config overrides for how the published weights of configs/model ``model`` take their input
    (:data:`PUBLISHED_INPUT`; none: darknet's letterbox)."""
    return list(PUBLISHED_INPUT.get(model, []))


# A converted model's data config: COCO-format data whose files the user names when evaluating or fine-tuning
# (tools/eval.py checkpoint=… data=coco data.val_json=… data.val_images=…).
_DATA = ["data=coco", "data.train_json=null", "data.train_images=null", "data.val_json=null", "data.val_images=null"]


def converted_config(model: str | DictConfig, img_size: int, overrides: Sequence[str] = (),
                     values: dict | None = None) -> dict:
    """The stored config of a converted ``model`` (a configs/model name with Hydra ``overrides`` of the train
    config, or a composed model config) evaluated at ``img_size``; then ``values`` ({dotted key: value})."""
    from detkit.api import compose_train_config
    from detkit.app.train import stored_config

    if not isinstance(model, str) and any(o.lstrip("+~").startswith("model.") for o in overrides):
        raise ValueError("model.* overrides go into the model config given, not into overrides")
    name = [f"model={model}"] if isinstance(model, str) else []
    cfg = compose_train_config([*name, *_DATA, f"data.img_size={img_size}", f"data.test_size={img_size}",
                                *overrides])
    with open_dict(cfg):
        if not isinstance(model, str):
            cfg.model = model
        for key, value in (values or {}).items():
            OmegaConf.update(cfg, key, value, merge=False)
    return stored_config(cfg)


def build_converted(config: dict, num_classes: int):
    from detkit.app.build import build_model

    cfg = OmegaConf.create(config)
    return build_model(cfg.model, num_classes, cfg.get("channel_spec")).eval()


def save_converted(model, config: dict, out: str | Path, source: dict,
                   class_names: Sequence[str] = COCO80_NAMES) -> Path:
    """Write ``model`` as a detkit checkpoint (atomically): its weights, ``config`` and ``class_names``, and
    ``converted_from`` (``source``: what it was made from)."""
    weights = model.state_dict()
    state = {"model": weights, "weights": weights, "config": config, "class_names": list(class_names),
             "converted_from": dict(source)}
    return save_checkpoint(state, out)


def convert_darknet(weights: str | Path, out: str | Path, model: str | DictConfig = "yolov3", img_size: int = 416,
                    overrides: Sequence[str] = (), class_names: Sequence[str] = COCO80_NAMES) -> Path:
    """Darknet ``.weights`` (80 COCO classes unless ``class_names`` says otherwise) → a detkit checkpoint of
    ``model`` (a configs/model name or a model config) at ``img_size``, with darknet's BatchNorm ε and its
    letterbox grey (0.5: ``data.pad_value`` 127.5)."""
    from detkit.convert.darknet import DARKNET_BN_EPS, DARKNET_PAD_VALUE, load_weights

    config = converted_config(model, img_size, overrides,
                              {"model.bn_eps": DARKNET_BN_EPS, "data.pad_value": DARKNET_PAD_VALUE})
    if config["model"].get("nms") == "diou":  # yolov4.cfg's [yolo] layers evaluate with nms_kind=greedynms
        config["model"]["nms"] = "nms"
    detector = build_converted(config, len(class_names))
    header = load_weights(detector, weights)
    source = {"format": "darknet", "file": str(weights), "version": f"{header.major}.{header.minor}.{header.revision}",
              "seen": int(header.seen)}
    return save_converted(detector, config, out, source, class_names)
