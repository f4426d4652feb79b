"""The non-finite loss guard."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from detkit.engine import distributed
from detkit.engine.hooks.base import Hook


class NonFiniteGuard(Hook):
    """A step whose loss is NaN/inf is skipped with a warning naming the loss terms and the batch's image ids;
    ``max_nonfinite`` such steps in a row stop the run with that message (FloatingPointError)."""

    priority = 5

    def __init__(self, max_nonfinite: int) -> None:
        self.max_nonfinite, self.streak = max(int(max_nonfinite), 1), 0

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        """Whether the loss is finite in every process (all must skip a step together, or DDP deadlocks)."""
        finite = torch.isfinite(loss.detach()).float()
        if distributed.current().size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def check_loss(self, trainer, losses: dict, targets: list[dict]) -> bool:
        if self._all_finite(sum(losses.values())):
            return True
        state = trainer.state
        self.streak += 1
        state.skipped_steps += 1
        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        ids = [t.get("image_id") for t in targets]
        message = (f"non-finite loss at epoch {state.epoch} step {state.step_in_epoch} (global step "
                   f"{state.global_step}): {detail}; image ids {ids}")
        if self.streak >= self.max_nonfinite:
            raise FloatingPointError(f"{message}; {self.streak} step(s) in a row, stopping: lower the "
                                     f"learning rate or check the data")
        warnings.warn(f"{message}; step skipped ({self.streak} in a row)", RuntimeWarning, stacklevel=4)
        return False

    def after_step(self, trainer) -> None:
        if not trainer.state.step_skipped:
            self.streak = 0
