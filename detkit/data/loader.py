"""Batching and sampling: a seeded, resumable sampler and the detection collate function."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Sample order fixed by (seed, epoch); can start part-way into an epoch; shards it over processes.

    ``set_epoch(e)`` picks the epoch's permutation; ``start_at(k)`` skips this process's first ``k`` samples
    once, so a run resumed mid-epoch draws exactly the samples the interrupted run had not yet drawn. With
    ``world`` > 1 processes, process ``rank`` takes every ``world``-th sample of the shared permutation from
    ``rank`` on (the tail that does not divide evenly is left out), so the ranks' batch ``t`` together are the
    single-process batch ``t`` of ``world`` times the size.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    @property
    def num_samples(self) -> int:
        """Samples this process draws in a whole epoch."""
        return self.length // self.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start_at(self, index: int) -> None:
        self.start = index

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        else:
            order = np.arange(self.length)
        if self.world > 1:
            order = order[: self.num_samples * self.world][self.rank :: self.world]
        start, self.start = self.start, 0
        return iter(order[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict]]:
    """Stack same-size (3, H, W) images into (B, 3, H, W) (a list when their sizes differ: ``data.resize=
    shorter_side``, which the R-CNNs pad as torchvision does); keep targets as a list of dicts."""
    images, targets = zip(*batch)
    return stack_if_same(images), list(targets)


def stack_if_same(images) -> torch.Tensor | list[torch.Tensor]:
    """(B, 3, H, W) from same-size (3, H, W) images, else the list of them."""
    return torch.stack(images) if len({im.shape for im in images}) == 1 else list(images)


def to_device(images: torch.Tensor | list[torch.Tensor], device) -> torch.Tensor | list[torch.Tensor]:
    """A batch from :func:`collate` on ``device``."""
    return images.to(device) if isinstance(images, torch.Tensor) else [im.to(device) for im in images]


def build_loader(
    dataset: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
    sampler: ResumableSampler | None = None, rank: int = 0, world: int = 1,
) -> DataLoader:
    """DataLoader over a detection dataset; training loaders shuffle by (seed, epoch) and drop the last
    partial batch (a batch of one would break BatchNorm statistics). ``sampler`` replaces the default
    ResumableSampler (e.g. a :class:`~detkit.data.multiscale.MultiScaleSampler`); ``rank``/``world`` shard a
    training loader over data-parallel processes (evaluation loaders are not sharded)."""
    if sampler is None:
        rank, world = (rank, world) if train else (0, 1)
        sampler = ResumableSampler(len(dataset), seed, shuffle=train, rank=rank, world=world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )
