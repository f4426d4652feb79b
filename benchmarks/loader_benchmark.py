"""Data-loader throughput for ``tools/benchmark.py loader``: images per second of the training loader with
Mosaic + the ``yolo`` preset against the default pipeline (TrainTransform), same data, same run."""

from __future__ import annotations

import time

from omegaconf import DictConfig

from benchmarks.benchmark import train_config
from detkit.app.build import build_dataset, prepare_data
from detkit.data.loader import build_loader

PIPELINES = {  # name -> config overrides; the first is the baseline
    "default (TrainTransform)": [],
    "mosaic + yolo preset": ["augment@data.augment=yolo", "data.mosaic.prob=1.0"],
}


def data_config(overrides: list[str]) -> DictConfig:
    """``data`` of the training config (built-in dataset) with ``overrides``."""
    return train_config(overrides).data


def images_per_second(dataset, batch_size: int, workers: int, batches: int, seed: int = 0) -> float:
    """Training-loader throughput over ``batches`` batches, after a first batch that absorbs worker start-up."""
    loader = build_loader(dataset, batch_size, train=True, seed=seed, num_workers=workers)
    batches = min(batches, len(loader) - 1)
    if batches < 1:
        raise ValueError(f"{len(dataset)} images are too few for 2 batches of {batch_size}")
    it = iter(loader)
    next(it)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += len(next(it)[0])
    return count / (time.perf_counter() - start)


def loader_throughputs(size: int = 320, workers: int = 2, batch_size: int = 16, batches: int = 20,
                       overrides: list[str] = ()) -> list[tuple[str, float]]:
    """(pipeline name, images/s) for each of :data:`PIPELINES` at ``size`` px; ``overrides`` apply to all
    (e.g. a smaller built-in dataset)."""
    rows = []
    for name, extra in PIPELINES.items():
        cfg = data_config([f"data.img_size={size}", *overrides, *extra])
        prepare_data(cfg)
        rows.append((name, images_per_second(build_dataset(cfg, "train"), batch_size, workers, batches)))
    return rows


def format_throughputs(title: str, rows: list[tuple[str, float]]) -> str:
    """A table of images/s with the ratio to the first row."""
    width = max(len(name) for name, _ in rows)
    lines = [title, f"{'pipeline':<{width}}  {'img/s':>8}  {'vs first':>8}"]
    lines += [f"{name:<{width}}  {rate:8.1f}  {rate / rows[0][1]:8.2f}" for name, rate in rows]
    return "\n".join(lines)
