"""Optimizers and learning-rate schedules, each a ``_target_`` of configs/optim/ or configs/schedule/."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


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


def sgd(model: nn.Module, lr: float, weight_decay: float, momentum: float, nesterov: bool) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups`."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov)


def adamw(model: nn.Module, lr: float, weight_decay: float, momentum: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``momentum`` is Adam's beta1."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(momentum, 0.999))


class LRSchedule:
    """A LambdaLR lambda: multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``, a linear
    warmup from 0.1% over :attr:`warmup` steps and then :meth:`decay`. ``total_steps`` may be re-planned during
    the run (a time budget); LambdaLR saves a callable object's attributes in its state dict, so a resumed run
    gets them back.

    The warmup is counted in optimizer steps, not epochs (as detectron2's and mmdetection's): ``warmup_steps``,
    but at most ``max_warmup_fraction`` of the run, so a short run or a budget on a small dataset is not mostly
    warmup, and a large dataset is not warmed up for a whole fraction of an epoch it does not need."""

    def __init__(self, total_steps: int, warmup_steps: int, max_warmup_fraction: float = 1.0) -> None:
        if warmup_steps < 0 or not 0.0 <= max_warmup_fraction <= 1.0:
            raise ValueError(f"schedule: warmup_steps must be >= 0 and max_warmup_fraction in [0, 1], got "
                             f"{warmup_steps} and {max_warmup_fraction}")
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.max_warmup_fraction = max_warmup_fraction

    @property
    def warmup(self) -> int:
        """Warmup steps of the run as now planned."""
        return min(self.warmup_steps, round(self.max_warmup_fraction * self.total_steps))

    def __call__(self, step: int) -> float:
        warmup = self.warmup
        if step < warmup:
            return 1e-3 + (1.0 - 1e-3) * step / warmup
        return self.decay(step)

    def decay(self, step: int) -> float:
        raise NotImplementedError


class CosineSchedule(LRSchedule):
    """Warmup, then cosine decay from 1 to ``final_factor`` at ``total_steps``."""

    def __init__(self, total_steps: int, warmup_steps: int, final_factor: float,
                 max_warmup_fraction: float = 1.0) -> None:
        super().__init__(total_steps, warmup_steps, max_warmup_fraction)
        self.final_factor = final_factor

    def decay(self, step: int) -> float:
        warmup = self.warmup
        span = max(self.total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule(LRSchedule):
    """Warmup, then a multiplication by ``gamma`` at each fraction of the run in ``milestones``."""

    def __init__(self, total_steps: int, warmup_steps: int, milestones: Sequence[float], gamma: float,
                 max_warmup_fraction: float = 1.0) -> None:
        super().__init__(total_steps, warmup_steps, max_warmup_fraction)
        self.milestones, self.gamma = tuple(float(m) for m in milestones), gamma

    def decay(self, step: int) -> float:
        return self.gamma ** sum(step >= m * self.total_steps for m in self.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    schedule: Callable[..., LRSchedule] = CosineSchedule, **kwargs) -> LambdaLR:
    """Per-step LambdaLR over ``schedule(total_steps, warmup_steps, **kwargs)`` (an :class:`LRSchedule`, whose
    ``total_steps`` attribute re-plans the run)."""
    return LambdaLR(optimizer, schedule(total_steps, warmup_steps, **kwargs))
