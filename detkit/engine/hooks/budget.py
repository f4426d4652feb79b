"""A wall-clock budget for a training run (``trainer.max_minutes``), planned rather than cut off.

The run measures its own speed over its first steps and plans how many optimizer steps fit, so the lr
schedule, Mosaic's close-out and the EMA ramp are laid out for the run that will actually happen (a cosine
schedule cut at 60% is a much worse model than a cosine schedule planned for 60%). The plan is corrected a
few times, each from the speed of the steps since the previous plan (longer if the machine sped up, shorter if
it slowed down), and the run ends with its final evaluation and checkpoints inside the budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from detkit.engine import distributed
from detkit.engine.hooks.base import Hook

# Fractions of the plan at which it is measured again and corrected; none late in the run, where moving the
# end would bend the tail of the schedule.
REPLAN_AT = (0.1, 0.25, 0.5, 0.75)


class TimeBudgetHook(Hook):
    """Plans ``trainer`` to end, final evaluation included, within ``max_minutes`` of ``started``.

    Args:
        max_minutes: the budget (None: no budget, the hook does nothing), counted from ``started`` (a ``clock``
            value: the launch of the run, so building data and model counts too) plus the time earlier
            sessions of a resumed run used.
        eval_images: images of the validation set, for the estimate of an evaluation's time before one has
            been measured (assumed half a training image's cost each, plus ``fixed_eval_seconds``).
        eval_probe: callable(model) → the seconds one evaluation of ``model`` is expected to take, timed on a
            few validation images; called once per session, at its first plan, unless an evaluation has been
            measured (a resumed run's), in place of the ``eval_images`` guess (which
            a two-stage detector, thousands of RoIs per test image, exceeds many times over). Its own time is
            left out of the speed measurement.
        eval_every: epochs between evaluations (the last epoch is always evaluated), to reserve their time.
        skip_steps: first steps left out of the speed measurement (allocation, lazy initialisation); ≥ 1.
        measure_steps: steps measured before the first plan.
        final_seconds: reserve for what follows the last evaluation (checkpoints, plots).
        fixed_eval_seconds: an evaluation's cost besides inference (COCO evaluation, writing results).
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake one).

    Runs before the evaluation and checkpoint hooks (``after_epoch`` notes when an epoch's evaluation and
    checkpointing start; the next ``before_epoch`` or ``after_train`` measures them). The plan reaches the
    schedule, the EMA and Mosaic through :meth:`Trainer.plan` and their ``after_plan``.
    """

    priority = 20

    def __init__(self, max_minutes: float | None, started: float | None = None, eval_images: int = 0,
                 eval_every: int = 1, skip_steps: int = 3, measure_steps: int = 10, final_seconds: float = 2.0,
                 fixed_eval_seconds: float = 2.0, eval_probe: Callable[[nn.Module], float] | None = None,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"trainer.max_minutes must be positive, got {max_minutes}")
        self.clock = clock
        self.budget = None if max_minutes is None else 60.0 * max_minutes
        self.started = self.clock() if started is None else started
        self.eval_images, self.eval_every = eval_images, max(int(eval_every), 1)
        self.skip_steps, self.measure_steps = skip_steps, measure_steps
        self.final_seconds, self.fixed_eval_seconds, self.log = final_seconds, fixed_eval_seconds, log
        self.used_before = 0.0  # seconds of earlier sessions (resume)
        self.planned: int | None = None
        self.eval_seconds: float | None = None  # the last evaluation + checkpoint pause, measured
        self.eval_probe, self._probed = eval_probe, None  # (the probe's estimate, until one is measured)
        self._session_steps = 0
        self._mark: tuple[float, int] | None = None  # (time, global step) where the speed measurement starts
        self._pause = 0.0  # seconds since the mark spent in evaluations
        self._epoch_end: float | None = None
        self._replans = list(REPLAN_AT)

    def elapsed(self) -> float:
        return self.used_before + self.clock() - self.started

    def before_train(self, trainer) -> None:
        if self.budget is None:
            return
        if self.planned is not None:  # resumed: the earlier plan stands until measured again
            trainer.plan(self.planned)

    def _seconds_per_step(self, trainer) -> float | None:
        if self._mark is None or trainer.state.global_step <= self._mark[1]:
            return None
        return (self.clock() - self._mark[0] - self._pause) / (trainer.state.global_step - self._mark[1])

    def _evaluation_seconds(self, seconds_per_step: float, batch: int) -> float:
        if self.eval_seconds is not None:
            return self.eval_seconds
        if self._probed is not None:
            return self.fixed_eval_seconds + self._probed
        return self.fixed_eval_seconds + self.eval_images * seconds_per_step / max(batch, 1) / 2.0

    def _steps_that_fit(self, trainer, seconds_per_step: float) -> int:
        """The total steps such that training, the evaluations due on the way and the final one fit."""
        left = self.budget - self.elapsed() - self.final_seconds
        evaluation = self._evaluation_seconds(seconds_per_step, trainer.state.batch_size)
        per_epoch, now = max(trainer.state.steps_per_epoch, 1), trainer.state.global_step

        def cost(steps: int) -> float:  # seconds from now to the end of the final evaluation
            epochs = math.ceil(steps / per_epoch)
            between = sum(1 for e in range(trainer.state.epoch + 1, epochs) if e % self.eval_every == 0)
            return (steps - now) * seconds_per_step + (between + 1) * evaluation

        low, high = now + 1, now + max(int(left / seconds_per_step), 1)  # cost() grows with steps: bisect
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if cost(middle) <= left else (low, middle - 1)
        return low

    def _agree(self, value: int) -> int:
        """Every process takes rank 0's decision (they must run the same number of steps)."""
        if distributed.current().size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def after_step(self, trainer) -> None:
        if self.budget is None:
            return
        self._session_steps += 1
        if self._session_steps == self.skip_steps:
            self._mark, self._pause = (self.clock(), trainer.state.global_step), 0.0
        seconds = self._seconds_per_step(trainer)
        measured = 0 if self._mark is None else trainer.state.global_step - self._mark[1]
        if seconds is not None and measured >= self.measure_steps:
            first = self.planned is None or self._session_steps == self.skip_steps + self.measure_steps
            due = not first and bool(self._replans) and trainer.state.global_step >= self._replans[0] * self.planned
            if first and self.eval_probe is not None and self.eval_seconds is None:
                start = self.clock()
                self._probed = self.eval_probe(trainer.state.eval_model)
                self._pause += self.clock() - start
            if first or due:
                earlier, self.planned = self.planned, self._agree(self._steps_that_fit(trainer, seconds))
                trainer.plan(self.planned)
                # the corrections still due: fractions passed neither of the earlier plan (the one that fired) nor
                # of this one (a resumed run's)
                now = trainer.state.global_step
                self._replans = [f for f in self._replans
                                 if now < f * self.planned and (earlier is None or now < f * earlier)]
                # ... each from the speed since this one: a machine that sped up or slowed down (another job
                # started or ended, caches warmed) is planned at its speed now, not its average since the start
                self._mark, self._pause = (self.clock(), now), 0.0
                if first:
                    epochs = self.planned / max(trainer.state.steps_per_epoch, 1)
                    evaluation = self._evaluation_seconds(seconds, trainer.state.batch_size)
                    self.log(f"time budget {self.budget / 60:.1f} min: {1 / seconds:.2f} steps/s measured, "
                             f"~{evaluation:.0f} s per evaluation -> {self.planned} steps ({epochs:.2f} epochs);"
                             f" lr schedule, Mosaic close-out and EMA planned for them, final evaluation included")
                elif self.planned != earlier:
                    self.log(f"time budget: {1 / seconds:.2f} steps/s over the last {measured} steps -> "
                             f"{self.planned} steps (was {earlier})")
        # Out of time (a budget shorter than the measurement, or another job slowed the machine down): end
        # now, with the final evaluation. The first skip_steps steps are no measure of a step (allocation, lazy
        # initialisation, cuDNN's autotuning: ssdlite_cpu's first bf16 step on an H200 took 12 s and ended a
        # 6.5-minute run there), nor of an evaluation guessed from one: until the speed is measured, only a budget
        # already spent ends the run.
        if seconds is None:
            over = self.elapsed() + self.final_seconds
        else:
            over = (self.elapsed() + seconds + self._evaluation_seconds(seconds, trainer.state.batch_size)
                    + self.final_seconds)
        if self._agree(int(over >= self.budget)) and trainer.state.global_step < trainer.state.total_steps:
            self.planned = trainer.state.global_step
            trainer.plan(self.planned)
            self.log(f"time budget: ending at step {trainer.state.global_step} to evaluate within the budget")

    def after_epoch(self, trainer) -> None:
        if self.budget is None:
            return
        self._epoch_end = self.clock()

    def _pause_ended(self, trainer) -> None:
        if self._epoch_end is None:
            return
        if trainer.state.metrics.get("epoch") == trainer.state.epoch:  # that epoch was evaluated: budgeted on its own
            self.eval_seconds = self.clock() - self._epoch_end
            self._pause += self.eval_seconds if self._mark is not None else 0.0
        # (other epoch ends, checkpoints alone, stay in the measured time per step: amortised over the epoch)
        self._epoch_end = None

    def before_epoch(self, trainer) -> None:
        if self.budget is None:
            return
        self._pause_ended(trainer)

    def after_train(self, trainer) -> None:
        if self.budget is None:
            return
        self._pause_ended(trainer)
        self.log(f"time budget {self.budget / 60:.1f} min: used {self.elapsed() / 60:.2f} min "
                 f"({trainer.state.global_step} steps)")

    def state_dict(self) -> dict:
        return {"used": self.elapsed(), "planned": self.planned, "eval_seconds": self.eval_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.used_before, self.planned, self.eval_seconds = state["used"], state["planned"], state["eval_seconds"]
