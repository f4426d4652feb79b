"""Data-adaptive defaults, applied to a training config before the model is built (``auto`` in train.yaml).

- Sizes: for a user dataset (``data.builtin`` null), a ``data.img_size`` left null becomes the median image's
  longer side rounded to a multiple of 32 and clamped to ``auto.size_range``; a ``data.test_size`` left null
  becomes ``auto.test_scale`` × the training size when small objects (< 32 px at the training size) are more
  than ``auto.small_fraction`` of the boxes, the training size otherwise.
- Priors, as YOLOv5's autoanchor: the best possible recall (BPR) of the configured priors over the training
  boxes letterboxed to the training size is computed; below ``auto.bpr_threshold`` new priors are fitted (YOLO
  anchors by k-means with 1 − IoU, SSD min/max sizes spread over the box-size range, RetinaNet/RPN anchor sizes
  rescaled, Fast R-CNN's dense proposals given the boxes' ratios and rescaled, G-CNN's grid rescaled) and kept
  only if their BPR is higher. The built-in data keeps the configs' priors unless
  ``auto.builtin`` (the main job's anchors reach a BPR of 0.9998 there anyway).

Chosen values are written into the config, so the checkpoint's stored config (and eval, predict, export,
``detkit.load``) rebuilds the same model. A value the user set is never replaced: through ``tools/train.py``, a
key named on the command line is the user's; a prior is replaced only when it equals the value some
``configs/model/*.yaml`` gives it (so one set from Python, e.g. ``detkit.train(["model.anchors=…"])``, is kept).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from detkit.anchors import (
    _pair,
    gcnn_box_sides,
    gcnn_grid_count,
    grid_anchor_shapes,
    grid_iou_recall,
    iou_recall,
    kmeans_anchors,
    ratio_recall,
    ssd_box_shapes,
)
from detkit.data.anchor_stats import SizeStats
from detkit.utils.resolvers import config_dir, scaled_size

SMALL = 32.0      # a box under this side (√(w·h), input pixels) is small, as COCO's area < 32²
MULTIPLE = 32     # chosen sizes are multiples of the largest stride of the zoo's detectors


def command_line_keys() -> list[str]:
    """The config keys set on the command line of a Hydra app (``tools/train.py``); none outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keys = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task if "=" in o]
    return [k for k in keys if "." in k and "@" not in k]  # group choices (model=…) set no value


def named(key: str, keys: Sequence[str]) -> bool:
    """Whether ``key`` (``model.anchors``) or a key inside or around it is among ``keys``."""
    return any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in keys)


def file_values(group: str, key: str) -> list:
    """The values ``configs/<group>/*.yaml`` give ``key`` (a dotted path inside the group), as written; a value
    that interpolates another group's key (data's ``test_size`` reads ``data.img_size``) is left out: a file on
    its own cannot resolve it."""
    values = []
    for path in sorted((config_dir() / group).glob("*.yaml")):
        value = OmegaConf.select(OmegaConf.load(path), key, default=None, throw_on_resolution_failure=False)
        if value is not None:
            values.append(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return values


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def _with(tree: dict, values: dict) -> dict:
    """A copy of the nested dict ``tree`` with ``values`` at their dotted keys."""
    tree = copy.deepcopy(tree)
    for key, value in values.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
    return tree


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def replaceable(model_cfg: dict, keys: Sequence[str], cli_keys: Sequence[str], optional: Sequence[str] = ()) -> bool:
    """Whether the priors at ``keys`` of ``model_cfg`` are a config file's, not the user's; an ``optional`` key
    may also be absent or null (then it is not fitted), but not named on the command line."""
    for key in [*keys, *optional]:
        if named(f"model.{key}", cli_keys):
            return False
        try:
            value = _get(model_cfg, key)
        except (KeyError, TypeError):  # a config without this key (priors: null) has nothing to replace
            if key in optional:
                continue
            return False
        if value is None and key in optional:
            continue
        if not any(_close(value, v) for v in file_values("model", key)):
            return False
    return True


# --- priors of each detector family: their keys, their shapes at the training size, their BPR and their fit ---

@dataclass(frozen=True)
class Family:
    """How one detector family takes its priors: the ``keys`` of its config that hold them, the (A, 2) prior
    shapes in input pixels a config gives at a training size, the BPR of box shapes ``wh`` for those shapes,
    and the new values of ``keys`` fitted to ``wh``."""

    keys: tuple[str, ...]
    shapes: Callable[[dict, int], Tensor]
    recall: Callable[[Tensor, Tensor, dict], float]
    fit: Callable[[Tensor, dict, int, int], dict]
    optional: tuple[str, ...] = ()  # keys a config may lack (then not fitted)


def _yolo_fit(wh: Tensor, model: dict, img_size: int, seed: int) -> dict:
    levels, per_level = len(model["anchors"]), len(model["anchors"][0])
    if len(wh) < levels * per_level:
        return {}
    anchors, _ = kmeans_anchors(wh, levels * per_level, seed=seed)
    rounded = [[round(v, 1) for v in shape] for shape in anchors.tolist()]
    return {"anchors": [rounded[i:i + per_level] for i in range(0, len(rounded), per_level)]}


def _yolo_ratio(model: dict) -> float:
    return model["ratio_thresh"] if model["ratio_thresh"] > 1 else 4.0


YOLO = Family(
    keys=("anchors",),
    shapes=lambda model, size: torch.tensor(model["anchors"], dtype=torch.float32).reshape(-1, 2),
    # a ratio_thresh of 1 or less gives each box its best anchor only (YOLOv2/v3): BPR at YOLOv5's 4 then
    recall=lambda wh, shapes, model: ratio_recall(wh, shapes, _yolo_ratio(model)),
    fit=_yolo_fit,
)


def _ssd_scale(model: dict, img_size: int) -> float:
    """Default-box sizes are stated at ``priors.image_size`` and scale with the input (ssd_prior_config)."""
    reference = model["priors"]["image_size"]
    ref_h, ref_w = (reference, reference) if isinstance(reference, (int, float)) else reference
    return img_size / math.sqrt(ref_h * ref_w)


def _ssd_fit(wh: Tensor, model: dict, img_size: int, seed: int) -> dict:
    # SSD's rule (min sizes linear over the levels) over the box sides present, 2nd to 98th percentile
    side = wh.prod(dim=1).sqrt()
    if not len(side):
        return {}
    low, high = (torch.quantile(side, q).item() for q in (0.02, 0.98))
    levels = len(model["priors"]["min_sizes"])
    step = (high - low) / max(levels - 1, 1) or low / 2
    scale = _ssd_scale(model, img_size)
    mins = [round((low + k * step) / scale, 1) for k in range(levels)]
    return {"priors.min_sizes": mins, "priors.max_sizes": [round(m + step / scale, 1) for m in mins]}


def _ssd_shapes(model: dict, size: int) -> Tensor:
    """(A, 3) (w, h, step) of the default boxes at the training size; (A, 2) for a config without ``steps``.
    Box sizes scale with the input (ssd_prior_config); a map's stride does not (a stride-8 layer stays stride 8),
    so the steps are the configured ones, at most the input's side."""
    priors, scale = model["priors"], _ssd_scale(model, size)
    steps = priors.get("steps")
    return ssd_box_shapes([s * scale for s in priors["min_sizes"]], [s * scale for s in priors["max_sizes"]],
                          priors["aspect_ratios"],
                          None if steps is None else [[min(float(v), size) for v in _pair(step)] for step in steps])


def _ssd_recall(wh: Tensor, shapes: Tensor, model: dict) -> float:
    # SSD matches by IoU at the default boxes' own places: a box between two cell centres overlaps much less
    # than a centred one, so where the steps are known the recall counts positions (grid_iou_recall)
    if shapes.shape[1] == 3:
        return grid_iou_recall(wh, shapes[:, :2], shapes[:, 2], model["iou_threshold"])
    return iou_recall(wh, shapes, model["iou_threshold"])


SSD = Family(
    keys=("priors.min_sizes", "priors.max_sizes"),
    shapes=_ssd_shapes,
    recall=_ssd_recall,
    fit=_ssd_fit,
)


def _rescaled_fit(key: str, family: Callable[[], Family]) -> Callable[[Tensor, dict, int, int], dict]:
    """Fit of grid anchors: every size times one factor 2^(j/4), |j| ≤ 16, the one of highest BPR (the
    smallest change among equals: :func:`_best_factor` at no cost), so levels keep their spacing and order."""

    def fit(wh: Tensor, model: dict, img_size: int, seed: int) -> dict:
        sizes = _get(model, key)
        return _best_factor(family(), model, wh, img_size, lambda factor: {key: _scale_nested(sizes, factor)},
                            lambda trial: 0, span=16)

    return fit


def _scale_nested(sizes, factor: float):
    if isinstance(sizes, (list, tuple)):
        return [_scale_nested(s, factor) for s in sizes]
    return round(sizes * factor, 1)


RETINANET = Family(
    keys=("anchor_sizes",),
    shapes=lambda model, size: grid_anchor_shapes(
        [[b * s for s in model["anchor_scales"]] for b in model["anchor_sizes"]], model["ratios"]),
    recall=lambda wh, shapes, model: iou_recall(wh, shapes, model["fg_iou"]),
    fit=_rescaled_fit("anchor_sizes", lambda: RETINANET),
)
RPN = Family(
    keys=("rpn.sizes",),
    shapes=lambda model, size: grid_anchor_shapes(model["rpn"]["sizes"], model["rpn"]["ratios"]),
    recall=lambda wh, shapes, model: iou_recall(wh, shapes, model["rpn"]["fg_iou"]),
    fit=_rescaled_fit("rpn.sizes", lambda: RPN),
)


def _best_factor(family: Family, model: dict, wh: Tensor, img_size: int, values_at: Callable[[float], dict],
                 cost: Callable[[dict], float], span: int = 8) -> dict:
    """The ``values_at(2^(j/4))`` (|j| ≤ ``span``; 8: a factor of 1/4 … 4) of highest BPR, then of lowest
    ``cost(config)`` (the boxes a config makes per image), then of the smallest change."""
    best, best_rank = {}, None
    for j in range(-span, span + 1):
        values = values_at(2 ** (j / 4))
        trial = _with(model, values)
        recall = round(family.recall(wh, family.shapes(trial, img_size), trial), 9)
        rank = (-recall, cost(trial), abs(j))
        if best_rank is None or rank < best_rank:
            best, best_rank = values, rank
    return best


def _dense_count(model: dict, img_size: int) -> int:
    """Dense proposals per ``img_size``² input (before dropping tiny clipped ones)."""
    proposals = model["proposals"]
    stride, sizes, ratios = proposals["stride"], proposals["sizes"], proposals["ratios"]
    if isinstance(stride, (list, tuple)):
        return sum(math.ceil(img_size / v) ** 2 for v in stride) * len(ratios)
    return math.ceil(img_size / stride) ** 2 * len(sizes) * len(ratios)


def _quantile_ratios(wh: Tensor, count: int) -> list[float]:
    """``count`` ratios h/w at evenly spaced quantiles of the boxes' log-ratios, rounded, equal ones merged."""
    log_ratio = (wh[:, 1] / wh[:, 0]).log()
    quantiles = torch.tensor([(k + 0.5) / count for k in range(count)], dtype=log_ratio.dtype)
    return list(dict.fromkeys(min(max(round(v, 2), 0.01), 100.0)
                              for v in torch.quantile(log_ratio, quantiles).exp().tolist()))


def _dense_fit(wh: Tensor, model: dict, img_size: int, seed: int) -> dict:
    """Fast R-CNN's dense proposals: as many ratios h/w as configured at evenly spaced quantiles of the boxes'
    log-ratios (equal ones merged), then every size and every stride times one factor (:func:`_best_factor`)."""
    proposals = model["proposals"]
    count = len(proposals["ratios"])
    if len(wh) < count:
        return {}
    ratios = _quantile_ratios(wh, count)
    stride, sizes = proposals["stride"], proposals["sizes"]

    def values_at(factor: float) -> dict:
        strides = ([max(1, round(v * factor)) for v in stride] if isinstance(stride, (list, tuple))
                   else max(1, round(stride * factor)))
        return {"proposals.sizes": [round(v * factor, 1) for v in sizes], "proposals.stride": strides,
                "proposals.ratios": ratios}

    return _best_factor(DENSE, model, wh, img_size, values_at, lambda trial: _dense_count(trial, img_size))


def _grid_fit(wh: Tensor, model: dict, img_size: int, seed: int) -> dict:
    """G-CNN's grid: as many ratios h/w as configured (``grid_ratios``, absent: the paper's squares) at evenly
    spaced quantiles of the boxes' log-ratios (equal ones merged), then every scale times one factor
    (:func:`_best_factor`), at most the whole image (equal scales merged); the boxes grow as the squared inverse of
    the scale, so among grids of equal BPR the smallest wins."""
    scales, overlap = model["grid_scales"], model["grid_overlap"]
    ratios = model.get("grid_ratios")
    fitted = {}
    if ratios is not None and len(wh) >= len(ratios):
        fitted = {"grid_ratios": _quantile_ratios(wh, len(ratios))}
    ratios = fitted.get("grid_ratios", ratios or [1.0])

    def values_at(factor: float) -> dict:
        return {"grid_scales": sorted({min(1.0, s * factor) for s in scales}, reverse=True), **fitted}

    return _best_factor(GRID, model, wh, img_size, values_at,
                        lambda trial: gcnn_grid_count(trial["grid_scales"], overlap, ratios))


def _dense_shapes(model: dict, size: int) -> Tensor:
    # DenseProposals drops boxes narrower than its min_size: those shapes never exist
    proposals = model["proposals"]
    shapes = grid_anchor_shapes([[s] for s in proposals["sizes"]], proposals["ratios"])
    return shapes[shapes.amin(dim=1) >= proposals.get("min_size", 4.0)]


DENSE = Family(
    keys=("proposals.sizes", "proposals.stride", "proposals.ratios"),
    shapes=_dense_shapes,
    recall=lambda wh, shapes, model: iou_recall(wh, shapes, model["fg_iou"]) if len(shapes) else 0.0,
    fit=_dense_fit,
)
def _grid_shapes(model: dict, size: int) -> Tensor:
    # the grid's box shapes on a (square, letterboxed) size² training input
    sides = [gcnn_box_sides(s, r) for s in model["grid_scales"] for r in model.get("grid_ratios") or [1.0]]
    return torch.tensor(sides, dtype=torch.float32) * size


GRID = Family(  # boxes of a fraction of the (square, letterboxed) training input; assigned above assign_iou
    keys=("grid_scales",),
    optional=("grid_ratios",),
    shapes=_grid_shapes,
    recall=lambda wh, shapes, model: iou_recall(wh, shapes, model["assign_iou"]),
    fit=_grid_fit,
)


def prior_family(model_cfg: DictConfig) -> Family | None:
    """The :class:`Family` of the detector ``model_cfg`` builds; None for one without priors to fit."""
    from detkit.models.detectors.fast_rcnn import FastRCNN
    from detkit.models.detectors.fpn_rcnn import FPNRCNN
    from detkit.models.detectors.gcnn import GCNN
    from detkit.models.detectors.retinanet import RetinaNet
    from detkit.models.detectors.ssd import SSD as SSDDetector
    from detkit.models.detectors.yolo import YOLOv3

    cls = get_class(model_cfg._target_)
    for base, family in ((YOLOv3, YOLO), (SSDDetector, SSD), (RetinaNet, RETINANET), (FPNRCNN, RPN),
                         (FastRCNN, DENSE), (GCNN, GRID)):
        if issubclass(cls, base):
            return family
    return None


# --- sizes ---

def choose_sizes(stats: SizeStats, img_size: int | None, test_size: int | None, size_range: Sequence[int],
                 small_fraction: float, test_scale: float) -> tuple[int, int]:
    """(training size, test size): those given, the unset (None) ones chosen from ``stats`` as the module says."""
    if img_size is None:
        low, high = size_range
        img_size = min(max(round(stats.median_long_side() / MULTIPLE) * MULTIPLE, low), high)
    if test_size is None:
        side = stats.letterboxed(img_size, min_size=0.0).prod(dim=1).sqrt()
        small = (side < SMALL).double().mean().item() if len(side) else 0.0
        test_size = scaled_size(img_size, test_scale, MULTIPLE) if small > small_fraction else img_size
    return int(img_size), int(test_size)


def fill_sizes(data_cfg: DictConfig, read_train: Callable[[], object], auto: DictConfig | dict | None = None,
               log: Callable[[str], None] = print) -> dict:
    """For the tools that read a dataset without training it (check_dataset, anchors, browse_dataset): set the
    sizes a user dataset leaves null the way training would (:func:`choose_sizes` with ``auto``'s settings,
    train.yaml's ``auto`` block when None). Returns the {key: value} it set."""
    keys = [k for k in ("img_size", "test_size") if data_cfg.get(k) is None]
    if not keys or data_cfg.get("builtin"):
        return {}
    if auto is None:
        auto = OmegaConf.load(config_dir() / "train.yaml").auto
    from detkit.data.anchor_stats import size_stats

    changed = _set_sizes(data_cfg, size_stats(read_train()), keys, auto)
    log(f"sizes chosen from the training images as training would: data.img_size={data_cfg.img_size}, "
        f"data.test_size={data_cfg.test_size} (set them to choose)")
    return changed


def _set_sizes(data_cfg: DictConfig, stats: SizeStats, keys: Sequence[str], auto) -> dict:
    """Write :func:`choose_sizes`' choice into the ``keys`` (img_size, test_size) of ``data_cfg`` that are
    null; returns the {"data.KEY": value} set."""
    sizes = choose_sizes(stats, data_cfg.get("img_size"), data_cfg.get("test_size"), auto["size_range"],
                         auto["small_fraction"], auto["test_scale"])
    changed = {}
    for key, value in zip(("img_size", "test_size"), sizes):
        if key in keys:
            data_cfg[key] = changed[f"data.{key}"] = value
    return changed


def fit_priors(family: Family, model: dict, wh: Tensor, img_size: int, threshold: float, seed: int
               ) -> tuple[dict, float, float]:
    """(new prior values, or {} to keep the configured ones; BPR before; BPR after) for box shapes ``wh``."""
    before = family.recall(wh, family.shapes(model, img_size), model)
    if before >= threshold:
        return {}, before, before
    values = family.fit(wh, model, img_size, seed)
    fitted = _with(model, values)
    after = family.recall(wh, family.shapes(fitted, img_size), fitted)
    return (values, before, after) if values and after > before else ({}, before, before)


def fixed_input_sizes(cfg: DictConfig, cli_keys: Sequence[str], log: Callable[[str], None] = print) -> dict:
    """A model with a fixed input (``model.input_size``: YOLOv1's grid) sets ``data.img_size``
    and ``data.test_size`` to it where they are null or a data config file's default, and not named on the
    command line (a chosen size that differs is then a ConfigError at the model's size check, not a failure at
    its first forward). Returns the {key: value} set."""
    fixed = cfg.model.get("input_size") if "model" in cfg else None
    if not isinstance(fixed, int):
        return {}
    changed = {}
    for key in ("img_size", "test_size"):
        value = cfg.data.get(key)
        default = value is None or value in file_values("data", key)
        if default and value != fixed and not named(f"data.{key}", cli_keys):
            cfg.data[key] = changed[f"data.{key}"] = fixed
    if changed:
        log(f"fixed input: {cfg.model._target_.rsplit('.', 1)[-1]} takes {fixed} px inputs (model.input_size), "
            f"so data.img_size = data.test_size = {fixed}")
    return changed


def apply_auto(cfg: DictConfig, read_train: Callable[[], object], log: Callable[[str], None] = print) -> dict:
    """Write the data-adaptive sizes and priors into ``cfg`` (``cfg.auto`` says which; absent: none, but a
    model's fixed input size is always applied: :func:`fixed_input_sizes`); ``read_train()`` gives the
    untransformed training reader, read only when something is to be chosen. Returns the {key: value} it set."""
    cli_keys = command_line_keys()
    fixed = fixed_input_sizes(cfg, cli_keys, log)
    auto = cfg.get("auto")
    if not auto:
        return fixed
    size_keys = [k for k in ("img_size", "test_size")
                 if auto.sizes and not cfg.data.get("builtin") and cfg.data.get(k) is None
                 and not named(f"data.{k}", cli_keys)]
    family = prior_family(cfg.model) if auto.priors and (auto.builtin or not cfg.data.get("builtin")) else None
    model = OmegaConf.to_container(cfg.model, resolve=False)
    if family is not None and not replaceable(model, family.keys, cli_keys, family.optional):
        family = None
    if not size_keys and family is None:
        return fixed
    from detkit.data.anchor_stats import size_stats

    stats = size_stats(read_train())
    changed = dict(fixed)
    if size_keys:
        changed.update(_set_sizes(cfg.data, stats, size_keys, auto))
        sizes = (cfg.data.img_size, cfg.data.test_size or cfg.data.img_size)
        log(f"auto sizes: training at {sizes[0]} px, testing at {sizes[1]} px (median image side "
            f"{stats.median_long_side():.0f} px; auto.sizes=false or data.img_size/test_size=N to choose)")
    if family is not None:
        img_size = int(cfg.data.img_size)
        values, before, after = fit_priors(family, model, stats.letterboxed(img_size), img_size,
                                           auto.bpr_threshold, cfg.seed)
        present = [k for k in family.optional if model.get(k) is not None]
        keys = ", ".join(f"model.{k}" for k in (*family.keys, *present))
        if values:
            for key, value in values.items():
                OmegaConf.update(cfg.model, key, value, merge=False)
                changed[f"model.{key}"] = value
            shown = "; ".join(f"model.{k}={v}" for k, v in values.items())
            log(f"auto priors: best possible recall {before:.4f} < {auto.bpr_threshold} at {img_size} px; "
                f"fitted {keys}: recall {after:.4f}: {shown}")
        elif before < auto.bpr_threshold:
            log(f"auto priors: best possible recall {before:.4f} < {auto.bpr_threshold} at {img_size} px, but no "
                f"fit of {keys} does better; kept")
        else:
            log(f"auto priors: best possible recall of {keys} {before:.4f} at {img_size} px")
    return changed
