"""The learning-rate schedule and gradient clipping as hooks."""

from __future__ import annotations

from torch import nn

from detkit.engine.hooks.base import Hook


class ScheduleHook(Hook):
    """Steps a per-step ``scheduler`` after every optimizer step (skipped ones too: the schedule is a function
    of the step count) and lays it out over the planned run: :meth:`after_plan` sets ``total_steps`` on its
    lambdas (:class:`~detkit.engine.optim.LRSchedule`). Runs first, so later hooks see the next step's lr."""

    priority = 0

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def after_step(self, trainer) -> None:
        self.scheduler.step()

    def after_plan(self, trainer) -> None:
        for schedule in getattr(self.scheduler, "lr_lambdas", ()):
            if hasattr(schedule, "total_steps"):
                schedule.total_steps = trainer.state.total_steps

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class GradClipHook(Hook):
    """Clips the global gradient norm of the model to ``max_norm`` (None or 0: no clipping). Runs last among
    the ``after_backward`` hooks, so it clips what they added (e.g. the sparsity subgradient)."""

    priority = 100

    def __init__(self, max_norm: float | None) -> None:
        self.max_norm = max_norm

    def after_backward(self, trainer) -> None:
        if self.max_norm:
            nn.utils.clip_grad_norm_(trainer.model.parameters(), self.max_norm)
