"""Exponential moving average of model weights, as a trainer hook (the YOLO recipe: a decay that ramps up).

Evaluating the averaged weights instead of the last ones smooths out the noise of the final optimizer steps,
which matters most in short, high-learning-rate schedules.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from detkit.engine.hooks.base import Hook


class ModelEMA:
    """Shadow copy of a model: ``θ_ema ← d·θ_ema + (1 − d)·θ`` after every optimizer step, with
    ``d = decay · (1 − exp(−updates / tau))`` so early updates (when weights move fast) count more.
    BatchNorm running statistics are averaged the same way."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, tau: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach(), alpha=1 - d)
            else:
                value.copy_(current[name])

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]


class EMAHook(Hook):
    """Keeps a :class:`ModelEMA` of ``trainer.model`` up to date and makes it ``state.eval_model`` (what
    evaluation and checkpoints use). A re-planned run (:meth:`Trainer.plan`) ramps the decay up over
    ``tau`` scaled by planned / configured steps, so a shorter run averages proportionally sooner.
    ``enabled=False``: the hook does nothing."""

    priority = 10
    main_process_only = True

    def __init__(self, decay: float, tau: float, enabled: bool = True) -> None:
        self.decay, self.tau, self.enabled = decay, tau, enabled
        self.planned_tau = tau
        self.ema: ModelEMA | None = None
        self._pending: dict | None = None

    def before_train(self, trainer) -> None:
        if not self.enabled:
            return
        if self.ema is None:
            self.ema = ModelEMA(trainer.model, self.decay, self.tau)
            if self._pending is not None:
                self.ema.load_state_dict(self._pending)
        self.ema.tau = self.planned_tau
        trainer.state.eval_model = self.ema.module

    def after_plan(self, trainer) -> None:
        state = trainer.state
        self.planned_tau = self.tau * min(1.0, state.total_steps / max(state.configured_steps, 1))
        if self.ema is not None:
            self.ema.tau = self.planned_tau

    def after_step(self, trainer) -> None:
        if self.ema is not None:
            self.ema.update(trainer.model)

    def state_dict(self) -> dict:
        return self.ema.state_dict() if self.ema else {}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None
