"""The state the training loop and its hooks share (:class:`TrainState`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class TrainState:
    """One object the :class:`~detkit.engine.trainer.Trainer` and every hook read and write; nothing else is
    shared between hooks.

    Written by the loop:
        epoch: 0-based epoch in progress. step_in_epoch: optimizer steps done in it. global_step: optimizer
        steps done in the run. steps_per_epoch: optimizer steps in a full epoch (this process's share of the
        data). losses: the last step's loss terms (floats, ``loss`` their sum). batch_size: images in the last
        step, all processes together. step_time: its seconds. step_skipped: whether a hook refused its loss
        (:meth:`~detkit.engine.hooks.Hook.check_loss`).
    Written by :meth:`Trainer.plan` (a time budget): epochs, max_steps. configured_steps is the run's length
        as configured (epochs × steps_per_epoch), before any plan.
    Written by hooks: metrics and is_best (the evaluation hook: the latest validation metrics, whether they are
        the best so far), eval_model (the EMA hook: the weights to evaluate and save; the trained model
        otherwise), skipped_steps (the non-finite guard), stop_requested (any hook: end the run after this step,
        without the end-of-run hooks).
    """

    epochs: int
    steps_per_epoch: int
    eval_model: nn.Module | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    max_steps: int | None = None
    configured_steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0
    step_time: float = 0.0
    step_skipped: bool = False
    skipped_steps: int = 0
    metrics: dict = field(default_factory=dict)
    is_best: bool = False
    stop_requested: bool = False

    @property
    def total_steps(self) -> int:
        """The step the run ends at: the planned end, else epochs × steps_per_epoch."""
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch
