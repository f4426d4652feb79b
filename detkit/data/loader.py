"""Batching and sampling: a seeded, resumable sampler and the detection collate function."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Sample order fixed by (seed, epoch); can start part-way into an epoch.

    ``set_epoch(e)`` picks the epoch's permutation; ``start_at(k)`` skips its first ``k`` samples once, so a
    run resumed mid-epoch draws exactly the samples the interrupted run had not yet drawn.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, index: int) -> None:
        self.start = index

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.length - self.start


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-size (3, S, S) images into (B, 3, S, S); keep targets as a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
    sampler: ResumableSampler | None = None,
) -> DataLoader:
    """DataLoader over a detection dataset; training loaders shuffle by (seed, epoch) and drop the last
    partial batch (a batch of one would break BatchNorm statistics). ``sampler`` replaces the default
    ResumableSampler (e.g. a :class:`~detkit.data.multiscale.MultiScaleSampler`)."""
    sampler = sampler if sampler is not None else ResumableSampler(len(dataset), seed, shuffle=train)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )
