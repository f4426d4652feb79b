"""Starting a run from another run's (or a converted) checkpoint whose class count differs: everything but the
class outputs is kept."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def adapt_class_outputs(model: nn.Module, weights: Mapping[str, Tensor], old_classes: int
                        ) -> tuple[dict[str, Tensor], list[str]]:
    """``weights`` of a ``old_classes``-class ``model`` made to fit ``model`` (``model.num_classes`` classes):
    every tensor whose shape differs only in its first dimension, the number of outputs, is a class output.

    - An output laid out per anchor as (4 box, 1 objectness, C classes), as YOLO's, keeps each anchor's box and
      objectness rows and takes the class rows of ``model``'s own initialisation;
    - any other (per-anchor C or C + 1 scores: SSD, RetinaNet, the R-CNN heads) takes ``model``'s initialisation
      whole.

    Returns (weights that load into ``model``, the keys re-initialised in whole or in part). A tensor that differs
    in any other way is left as it is, for ``load_state_dict`` to refuse."""
    own = model.state_dict()
    new_classes = int(model.num_classes)
    anchors = getattr(model, "anchors", None)
    per_level = int(anchors.shape[1]) if isinstance(anchors, Tensor) and anchors.dim() == 3 else None
    adapted, reset = dict(weights), []
    for key, tensor in weights.items():
        target = own.get(key)
        if target is None or target.shape == tensor.shape or target.shape[1:] != tensor.shape[1:]:
            continue
        fresh = target.clone()
        if per_level and tensor.shape[0] == per_level * (5 + old_classes) and \
                target.shape[0] == per_level * (5 + new_classes):
            old = tensor.view(per_level, 5 + old_classes, *tensor.shape[1:])
            fresh.view(per_level, 5 + new_classes, *tensor.shape[1:])[:, :5] = old[:, :5]
        adapted[key] = fresh
        reset.append(key)
    return adapted, reset


def describe(reset: list[str], old_classes: int, new_classes: int, checkpoint) -> str:
    return (f"{checkpoint}: {old_classes} classes, this run {new_classes}: every weight kept but the class "
            f"outputs, initialised afresh ({', '.join(reset)}; YOLO heads keep their box and objectness rows)")
