"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying BatchNorm γ/β and biases only hurts."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and not isinstance(module, nn.modules.batchnorm._NormBase)
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    """``sgd`` (momentum, Nesterov) or ``adamw`` over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}; expected sgd or adamw")


def lr_factor(step: int, total_steps: int, warmup_steps: int, policy: str = "cosine",
              final_factor: float = 0.05, milestones: tuple[float, ...] = (0.7, 0.9), gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    Linear warmup from 0.1% over ``warmup_steps``, then ``cosine`` decay to ``final_factor`` or ``step``
    decay by ``gamma`` at each fraction of the run in ``milestones``.
    """
    if step < warmup_steps:
        return 1e-3 + (1.0 - 1e-3) * step / warmup_steps
    if policy == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if policy == "step":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    raise ValueError(f"unknown schedule policy {policy!r}; expected cosine or step")


class LRSchedule:
    """:func:`lr_factor` as a LambdaLR lambda whose ``total_steps`` may be re-planned during the run (a time
    budget). LambdaLR saves a callable object's attributes in its state dict, so a resumed run gets them back."""

    def __init__(self, total_steps: int, warmup_steps: int, **kwargs) -> None:
        self.total_steps, self.warmup_steps, self.kwargs = total_steps, warmup_steps, kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, **self.kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, **kwargs):
    """Per-step LambdaLR over :func:`lr_factor` (an :class:`LRSchedule`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(total_steps, warmup_steps, **kwargs))
