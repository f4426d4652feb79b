"""The YOLO family side by side for ``tools/benchmark.py yolo``: each _cpu config trained for the same fixed
budget on the same data, then mAP@0.5, mAP@[.5:.95], parameters, FLOPs and CPU inference img/s.

Every config gets one recipe (AdamW at a constant ``lr``, the data config's batch and augmentation, no EMA,
fp32), so the table compares models, not training schedules; a budget this small ranks how fast each model
starts learning, not where it ends.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, open_dict

from benchmarks.benchmark import train_config
from detkit.app.build import build_data_loader, build_dataset, build_model, prepare_data, seed_everything
from detkit.evaluation.coco import predict
from detkit.evaluation.dataset import evaluate_dataset
from detkit.utils.complexity import complexity

TINY_CONFIGS = ("yolov1_cpu", "yolov2_cpu", "yolov3_cpu", "yolov3_spp_cpu", "yolov4_cpu")


@dataclass(frozen=True)
class YOLOResult:
    """One config's row: COCO ``ap50`` and ``ap`` on the validation split, ``params``, ``flops`` of one
    (1, 3, S, S) forward (multiply-add = 2), inference ``img_per_s`` over the validation split."""

    name: str
    ap50: float
    ap: float
    params: int
    flops: int
    img_per_s: float


def config_for(name: str, overrides: list[str] = ()) -> DictConfig:
    """The training config with ``model=name``; a model with an ``input_size`` (YOLOv1's FC head) gets
    ``data.img_size``; every version is evaluated at the training size (``data.test_size`` pinned to it)."""
    cfg = train_config([f"model={name}", *overrides])
    with open_dict(cfg):
        if "input_size" in cfg.model:
            cfg.model.input_size = cfg.data.img_size
        cfg.data.test_size = cfg.data.img_size
    return cfg


def benchmark_config(name: str, cfg: DictConfig, steps: int, lr: float = 1e-3) -> YOLOResult:
    """Train ``cfg.model`` (reported as ``name``) for ``steps`` batches of ``cfg.data``'s training split, then
    evaluate it on the validation split."""
    seed_everything(cfg.seed)
    prepare_data(cfg.data)
    train_set = build_dataset(cfg.data, "train", cfg.seed)
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    model = build_model(cfg.model, train_set.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = build_data_loader(train_set, cfg.data, train=True, seed=cfg.seed)
    model.train()
    for images, targets in itertools.islice(itertools.cycle(loader), steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    val_loader = build_data_loader(val_set, cfg.data, train=False, seed=cfg.seed)
    start = time.perf_counter()
    predictions = predict(model, val_loader)
    img_per_s = len(predictions) / (time.perf_counter() - start)
    metrics = evaluate_dataset(val_set, predictions, "coco")
    size = complexity(model, (1, 3, cfg.data.img_size, cfg.data.img_size))
    return YOLOResult(name, metrics["AP50"], metrics["AP"], size.params, size.flops, img_per_s)


def yolo_family(names: tuple[str, ...] = TINY_CONFIGS, steps: int = 200, overrides: list[str] = ()) -> list[YOLOResult]:
    """:func:`benchmark_config` for each config name, same ``overrides`` (data, size) for all."""
    return [benchmark_config(name, config_for(name, list(overrides)), steps) for name in names]


def format_results(title: str, rows: list[YOLOResult]) -> str:
    """A text table, one row per config."""
    width = max(len(r.name) for r in rows)
    lines = [title, f"{'model':<{width}}  {'mAP@0.5':>7}  {'mAP':>6}  {'params':>8}  {'GFLOPs':>7}  {'img/s':>7}"]
    lines += [f"{r.name:<{width}}  {r.ap50:7.3f}  {r.ap:6.3f}  {r.params / 1e6:7.2f}M  {r.flops / 1e9:7.2f}  "
              f"{r.img_per_s:7.1f}" for r in rows]
    return "\n".join(lines)
