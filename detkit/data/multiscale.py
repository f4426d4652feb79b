"""Multi-scale training (YOLOv2): the input side changes every few batches, drawn from a list of sizes.

:class:`MultiScaleSampler` yields ``(index, size)`` pairs, the size fixed by (seed, epoch, position in the
epoch), so it is the same whatever the worker count and after a resume mid-epoch; :class:`MultiScaleDataset`
sets the transform's ``size`` before each sample. All samples of a batch share one size as long as the loader's
batch size is the sampler's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from detkit.data.loader import ResumableSampler
from detkit.data.sample import DatasetWrapper

YOLOV2_SIZES = tuple(range(320, 609, 32))


class MultiScaleSampler(ResumableSampler):
    """ResumableSampler whose items are ``(index, size)``: positions ``[b·n, (b+1)·n)`` of an epoch, with
    ``n = batch_size · every``, share a size drawn from ``sizes`` by ``default_rng([seed, epoch, b, 2])``;
    positions count this process's samples, so data-parallel ranks change size together."""

    def __init__(self, length: int, batch_size: int, sizes: Sequence[int] = YOLOV2_SIZES, every: int = 10,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        super().__init__(length, seed, shuffle, rank, world)
        bad = [s for s in sizes if s % 32]
        if not sizes or bad:
            raise ValueError(f"multi-scale sizes must be a non-empty list of multiples of 32, got {list(sizes)}")
        self.batch_size, self.sizes, self.every = batch_size, tuple(int(s) for s in sizes), max(int(every), 1)

    def size_at(self, position: int) -> int:
        """Input side of the sample at ``position`` of the current epoch's order."""
        block = position // (self.batch_size * self.every)
        return self.sizes[int(np.random.default_rng([self.seed, self.epoch, block, 2]).integers(len(self.sizes)))]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.start
        for position, index in enumerate(super().__iter__(), start):
            yield index, self.size_at(position)


class MultiScaleDataset(DatasetWrapper):
    """Dataset wrapper taking ``(index, size)`` keys: sets ``size`` on the wrapped dataset when it has one (a
    Mosaic), else on its ``transforms``, then returns ``dataset[index]``. Other attributes are the dataset's."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, size = key
        target = self.dataset if hasattr(type(self.dataset), "size") else self.dataset.transforms
        if target.size != size:
            target.size = size
        return self.dataset[index]
