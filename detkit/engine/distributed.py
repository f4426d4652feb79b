"""Data-parallel training with PyTorch's own engine: ``torchrun`` sets the environment, this module reads it.

``torchrun --nproc_per_node=N tools/train.py ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`init_from_env` joins them into one process group (NCCL on CUDA, gloo on CPU). A
plain ``python tools/train.py`` is a world of one and touches nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0


def init_from_env(device: str) -> tuple[World, str]:
    """Join the process group described by torchrun's environment; returns the world and the device this
    process trains on (``cuda`` becomes ``cuda:LOCAL_RANK``). Without ``WORLD_SIZE`` > 1, a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return world, device


def current() -> World:
    """The world of an initialised process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def barrier() -> None:
    if current().size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Every rank arrives before any tears down: rank 0 hosts the TCP store, and leaving while another rank
        # still used the group aborted a gloo process now and then ("terminate called without an active
        # exception", SIGABRT).
        dist.barrier()
        dist.destroy_process_group()
