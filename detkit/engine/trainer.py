"""One training loop for every detector, extended through hooks (detectron2's ``TrainerBase`` pattern).

The loop knows a detector only through the common interface: ``model(images, targets)`` returns a dict of
scalar losses in train mode. Evaluation, logging, checkpointing and compression plug in as :class:`Hook`s.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from detkit.engine import distributed


class Hook:
    """Called by :class:`Trainer` at fixed points; override what you need. ``state_dict`` is saved in
    checkpoints so a resumed run restores the hook too."""

    def before_train(self, trainer: Trainer) -> None: ...
    def before_epoch(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...
    def after_backward(self, trainer: Trainer) -> None: ...
    def extra_losses(self, trainer: Trainer, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Loss terms to add to the model's, computed right after its forward pass on ``images`` (under the
        same autocast); e.g. distillation, which reads the student's outputs through forward hooks."""
        return {}

    def after_step(self, trainer: Trainer) -> None: ...
    def after_epoch(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": None}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA, or a CPU with AVX512-BF16/AMX): elsewhere bf16 is
    emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def out_of_memory_hint(images: torch.Tensor, accumulate: int):
    """Turns an out-of-memory error of a training step into one that says what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        text = str(error)
        if not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in text \
                and "can't allocate memory" not in text:
            raise
        n, _, h, w = images.shape
        raise MemoryError(
            f"out of memory in a training step on {images.device} with a batch of {n} images of {h}x{w}: lower "
            f"data.batch_size (e.g. data.batch_size={max(n // 2, 1)}) and raise trainer.accumulate (now "
            f"{accumulate}) to keep the same images per optimizer step, or lower data.img_size "
            f"({text.splitlines()[0][:200]})") from None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(precision, autocast dtype or None) for a ``trainer.precision`` setting on ``device``: ``auto`` becomes
    bf16 where :func:`native_bf16`, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    return precision, PRECISIONS[precision]


class Trainer:
    """Epoch/step loop with exact resume.

    Progress is ``epoch`` (0-based) and ``step_in_epoch`` (optimizer steps done in that epoch). The sample
    order and augmentation of an epoch depend only on (seed, epoch, index), so :meth:`load_state_dict` plus
    :meth:`train` continue a run as if it had never stopped, including from the middle of an epoch.

    Args:
        model: detector in the common interface.
        optimizer, scheduler: the scheduler is stepped once per optimizer step.
        loader: training loader built by :func:`detkit.data.loader.build_loader`.
        epochs: total epochs of the run.
        hooks: called in list order at every point.
        grad_clip_norm: clip the global gradient norm to this value (None: no clipping).
        channels_last: NHWC memory layout for model and inputs (faster convolutions on CPU).
        precision: ``"fp32"``, or ``"bf16"`` to run the forward pass under bfloat16 autocast (convolutions
            in bf16, weights, optimizer and the detector's own float32 casts untouched; no loss scaling is
            needed with bf16's float32 range); ``"fp16"``: float16 autocast with dynamic loss scaling
            (``torch.amp.GradScaler``, saved in checkpoints), for GPUs without bf16; ``"auto"``: bf16 where
            :func:`native_bf16`, else fp32.
        compile: ``torch.compile`` the training forward pass (True, or a backend name); the weights, the
            checkpoints and evaluation use the plain module.
        max_nonfinite: a step whose loss is NaN/inf is skipped with a warning naming the loss terms and the
            batch's image ids; this many such steps in a row stop the run with that message.
        accumulate: loader batches per optimizer step (gradient accumulation); ``step_in_epoch`` and
            ``global_step`` count optimizer steps.

    Under ``torchrun`` (an initialised process group) the model trains wrapped in DistributedDataParallel:
    each process runs its shard of every batch and gradients are averaged, so the step equals one process
    on the whole batch when the loss is a per-image mean.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loader: DataLoader,
        epochs: int,
        hooks: Sequence[Hook] = (),
        device: str | torch.device = "cpu",
        grad_clip_norm: float | None = None,
        channels_last: bool = False,
        precision: str = "fp32",
        max_nonfinite: int = 1,
        accumulate: int = 1,
        compile: bool | str = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.epochs, self.hooks, self.device = epochs, list(hooks), torch.device(device)
        self.grad_clip_norm = grad_clip_norm
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.precision, self.autocast_dtype = resolve_precision(precision, self.device)
        # float16's narrow range needs loss scaling; a disabled scaler passes everything through unchanged
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.compile = compile
        self.accumulate = max(int(accumulate), 1)
        self.max_nonfinite, self.nonfinite_streak, self.skipped_steps = max(int(max_nonfinite), 1), 0, 0
        self._forward: nn.Module = model  # the model, or its DistributedDataParallel wrapper while training
        self.ema = None  # a ModelEMA when an EMA hook is installed; evaluation and checkpoints then use it
        self.max_steps: int | None = None  # a planned end (time budget); None: epochs × steps_per_epoch
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.losses: dict[str, float] = {}
        self.batch_size = 0
        self.step_time = 0.0
        self.stop_requested = False
        self.metrics: dict = {}  # the latest evaluation, set by an evaluation hook
        self.is_best = False  # whether that evaluation is the best so far

    @property
    def steps_per_epoch(self) -> int:
        samples = getattr(self.loader.sampler, "num_samples", len(self.loader.dataset))  # this process's share
        return samples // (self.loader.batch_size * self.accumulate)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def plan(self, total_steps: int) -> None:
        """End the run after ``total_steps`` optimizer steps (a time budget's plan; the last epoch may be
        partial). Everything scheduled against the run's length follows: the number of epochs (so the last
        evaluation happens), the lr schedule (a ``total_steps`` attribute of the scheduler's lambdas, see
        :class:`~detkit.engine.optim.LRSchedule`), Mosaic's close-out epochs and the EMA ramp."""
        total_steps = max(int(total_steps), self.global_step)
        if self.max_steps is None:
            self._configured_steps = self.epochs * self.steps_per_epoch
        self.max_steps = total_steps
        self.epochs = max(math.ceil(total_steps / max(self.steps_per_epoch, 1)), self.epoch + 1)
        for schedule in getattr(self.scheduler, "lr_lambdas", ()):
            if hasattr(schedule, "total_steps"):
                schedule.total_steps = total_steps
        dataset = self.loader.dataset
        while dataset is not None:  # Mosaic, possibly inside a multi-scale wrapper
            own = getattr(dataset, "__dict__", {})  # (a wrapper's own attributes, not those it forwards)
            if own.get("close_last"):
                dataset.epochs = self.epochs
            dataset = own.get("dataset")
        if self.ema is not None:  # a shorter run ramps its EMA up proportionally faster
            self.ema.base_tau = getattr(self.ema, "base_tau", self.ema.tau)
            self.ema.tau = self.ema.base_tau * min(1.0, total_steps / max(self._configured_steps, 1))

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and deploy: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)

    def train(self) -> None:
        """Run from the current progress to the end; returns early if a hook sets ``stop_requested``."""
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.loader.dataset)} images, fewer than one optimizer step of "
                f"{self.loader.batch_size} x {self.accumulate} (accumulate) x {distributed.current().size} (processes)"
            )
        self.model.to(self.device, memory_format=self.memory_format).train()
        if distributed.current().size > 1 and not isinstance(self._forward, DistributedDataParallel):
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self._forward = DistributedDataParallel(self.model, device_ids=ids)
        if self.compile and not getattr(self._forward, "_compiled_by_trainer", False):
            backend = {"backend": self.compile} if isinstance(self.compile, str) else {}
            self._forward = torch.compile(self._forward, **backend)  # (the DDP wrapper, if any)
            self._forward._compiled_by_trainer = True
        self._call("before_train")
        while self.epoch < self.epochs and self.global_step < self.total_steps:
            self._run_epoch()
            if self.stop_requested:
                return
            self._call("after_epoch")
            self.epoch += 1
            self.step_in_epoch = 0
        self._call("after_train")

    def _run_epoch(self) -> None:
        for obj in (self.loader.sampler, self.loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(self.epoch)
        self.loader.sampler.start_at(self.step_in_epoch * self.loader.batch_size * self.accumulate)
        self._call("before_epoch")
        batches = []
        for batch in self.loader:
            batches.append(batch)
            if len(batches) < self.accumulate:
                continue
            self._call("before_step")
            start = time.perf_counter()
            self.run_step(batches)
            batches = []
            self.step_time = time.perf_counter() - start
            self.step_in_epoch += 1
            self.global_step += 1
            self._call("after_step")
            if (self.stop_requested or self.step_in_epoch >= self.steps_per_epoch
                    or self.global_step >= self.total_steps):
                return  # (an epoch's last loader batches that fill no optimizer step are left out)

    def run_step(self, batches: list[tuple[torch.Tensor, list[dict]]]) -> None:
        """One optimizer step over ``accumulate`` loader batches (gradients summed, each loss / accumulate)."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        images_seen = 0
        for i, (images, targets) in enumerate(batches):
            images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
            targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            # DDP averages gradients once per optimizer step, on the last backward
            last = i == len(batches) - 1
            no_sync = self._forward.no_sync if isinstance(self._forward, DistributedDataParallel) and not last else None
            with no_sync() if no_sync else contextlib.nullcontext(), out_of_memory_hint(images, self.accumulate):
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):
                    losses = self._forward(images, targets)
                    for hook in self.hooks:
                        losses.update(hook.extra_losses(self, images, targets))
                loss = sum(losses.values())
                if not self._all_finite(loss):
                    self._skip_step(losses, targets)
                    return
                self.scaler.scale(loss / len(batches) if len(batches) > 1 else loss).backward()
            for k, v in [*losses.items(), ("loss", loss)]:
                totals[k] = totals.get(k, 0.0) + v.item() / len(batches)
            images_seen += images.shape[0]
        self.nonfinite_streak = 0
        self.scaler.unscale_(self.optimizer)  # hooks and clipping see the true gradients
        self._call("after_backward")
        if self.grad_clip_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)  # (skipped by an fp16 scaler when the gradients overflowed)
        self.scaler.update()
        self.scheduler.step()
        self.batch_size = images_seen * distributed.current().size  # images in the step, all processes
        self.losses = totals

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        """Whether the loss is finite in every process (all must skip a step together, or DDP deadlocks)."""
        finite = torch.isfinite(loss.detach()).float()
        if distributed.current().size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_step(self, losses: dict, targets: list[dict]) -> None:
        self.nonfinite_streak += 1
        self.skipped_steps += 1
        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        ids = [t.get("image_id") for t in targets]
        message = (f"non-finite loss at epoch {self.epoch} step {self.step_in_epoch} (global step {self.global_step}):"
                   f" {detail}; image ids {ids}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_streak >= self.max_nonfinite:
            raise FloatingPointError(f"{message}; {self.nonfinite_streak} step(s) in a row, stopping: lower the "
                                     f"learning rate or check the data")
        warnings.warn(f"{message}; step skipped ({self.nonfinite_streak} in a row)", RuntimeWarning, stacklevel=3)
        self.scheduler.step()  # the schedule stays a function of the step count

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (hook states keyed by class name)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "max_steps": self.max_steps,
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        if self.step_in_epoch >= self.steps_per_epoch or (  # saved at an epoch's end, or a planned end
                state.get("max_steps") is not None and self.global_step >= state["max_steps"]):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        torch.set_rng_state(state["torch_rng"])
        hook_states = state.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in hook_states:
                hook.load_state_dict(hook_states[type(hook).__name__])
