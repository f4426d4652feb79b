"""The training loop: forward, backward, optimizer step; all else is a hook (docs/engine.md)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from detkit.engine import distributed
from detkit.engine.hooks.base import Hook
from detkit.engine.state import TrainState


def to_device(obj, device: torch.device):
    """``obj`` (a tensor, or lists/tuples/dicts of them and other values) with every tensor on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def model_to(model: nn.Module, device: torch.device | str, channels_last: bool = False) -> nn.Module:
    """``model`` on ``device``, its 4-D weights and buffers (convolutions) in the NHWC layout if ``channels_last``.
    ``Module.to(memory_format=...)`` would also convert 5-D tensors, which channels_last cannot hold (a locally
    connected layer's per-position kernels: darknet YOLOv1's head), and stop there."""
    model = model.to(device)
    if channels_last:
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return model


class Trainer:
    """Epoch/step loop with exact resume, in float32 (:class:`~detkit.engine.amp.AMPTrainer` adds autocast).

    The sample order and augmentation of an epoch depend only on (seed, epoch, index), so
    :meth:`load_state_dict` plus :meth:`train` continue a run as if it had never stopped, even mid-epoch.

    Args:
        model: in the common interface: ``model(images, targets)`` → dict of scalar losses in train mode.
        optimizer: stepped once per optimizer step (the schedule is a hook).
        loader: a loader whose sampler has ``start_at(index)`` (:func:`detkit.data.loader.build_loader`).
        epochs: epochs of the run as configured.
        hooks: called in increasing ``priority`` at every point; their ``state_key``s must differ.
        accumulate: loader batches per optimizer step (gradients summed, each loss / accumulate).
        channels_last: NHWC memory layout for the inputs (the caller converts the model).
        forward: the module to run the forward pass through (a DistributedDataParallel or ``torch.compile``
            wrapper of ``model``); ``model`` itself by default.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int,
                 hooks: Sequence[Hook] = (), device: str | torch.device = "cpu", accumulate: int = 1,
                 channels_last: bool = False, forward: nn.Module | None = None) -> None:
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.device = torch.device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.accumulate = max(int(accumulate), 1)
        self.forward_module = forward if forward is not None else model
        self.hooks = sorted(hooks, key=lambda hook: hook.priority)
        keys = [hook.state_key for hook in self.hooks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"hooks need distinct state keys (set Hook.name), got {keys}")
        samples = getattr(loader.sampler, "num_samples", len(loader.dataset)) if loader is not None else 0
        per_epoch = samples // (loader.batch_size * self.accumulate) if loader is not None else 0  # this process's
        self.state = TrainState(epochs=epochs, steps_per_epoch=per_epoch, eval_model=model,
                                configured_steps=epochs * per_epoch)

    @property
    def lr(self) -> float:  # the first param group's
        return self.optimizer.param_groups[0]["lr"]

    def call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)

    def plan(self, total_steps: int) -> None:
        """End the run after ``total_steps`` optimizer steps (the last epoch may be partial); hooks that lay
        anything out over the run's length follow in :meth:`Hook.after_plan`."""
        state = self.state
        state.max_steps = max(int(total_steps), state.global_step)
        state.epochs = max(math.ceil(state.max_steps / max(state.steps_per_epoch, 1)), state.epoch + 1)
        self.call("after_plan")

    def train(self) -> None:
        """Run from the current progress to the end; returns early when a hook sets ``state.stop_requested``."""
        state = self.state
        if state.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.loader.dataset)} images, fewer than one optimizer step of "
                f"{self.loader.batch_size} x {self.accumulate} (accumulate) x {distributed.current().size} (processes)"
            )
        model_to(self.model, self.device, self.memory_format == torch.channels_last).train()
        self.call("before_train")
        while state.epoch < state.epochs and state.global_step < state.total_steps:
            self.run_epoch()
            if state.stop_requested:
                return
            self.call("after_epoch")
            state.epoch += 1
            state.step_in_epoch = 0
        self.call("after_train")

    def run_epoch(self) -> None:
        state = self.state
        for obj in (self.loader.sampler, self.loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(state.epoch)
        self.loader.sampler.start_at(state.step_in_epoch * self.loader.batch_size * self.accumulate)
        self.call("before_epoch")
        batches = []
        for batch in self.loader:
            batches.append(batch)
            if len(batches) < self.accumulate:
                continue
            self.call("before_step")
            start = time.perf_counter()
            state.step_skipped = False
            self.run_step(batches)
            batches = []
            state.step_time = time.perf_counter() - start
            state.step_in_epoch += 1
            state.global_step += 1
            self.call("after_step")
            if (state.stop_requested or state.step_in_epoch >= state.steps_per_epoch
                    or state.global_step >= state.total_steps):
                return  # (an epoch's last loader batches that fill no optimizer step are left out)

    def run_step(self, batches: list[tuple[torch.Tensor, list[dict]]]) -> None:
        """One optimizer step over ``accumulate`` loader batches."""
        state = self.state
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        images_seen = 0
        for i, (images, targets) in enumerate(batches):
            images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
            targets = to_device(targets, self.device)
            for hook in self.hooks:
                images = hook.transform_images(self, images, targets)
            with self.sync_context(last=i == len(batches) - 1):
                with self.forward_context():
                    losses = self.forward_module(images, targets)
                    for hook in self.hooks:
                        losses.update(hook.extra_losses(self, images, targets))
                loss = sum(losses.values())
                if not all([hook.check_loss(self, losses, targets) for hook in self.hooks]):
                    self.optimizer.zero_grad(set_to_none=True)
                    state.step_skipped = True
                    return
                self.backward(loss / len(batches) if len(batches) > 1 else loss)
            for k, v in [*losses.items(), ("loss", loss)]:
                totals[k] = totals.get(k, 0.0) + v.item() / len(batches)
            images_seen += images.shape[0]
        self.gradients_ready()
        self.call("after_backward")
        self.optimizer_step()
        state.batch_size = images_seen * distributed.current().size  # images in the step, all processes
        state.losses = totals

    def sync_context(self, last: bool):
        """DDP averages gradients once per optimizer step: on the last backward of the accumulated batches."""
        if isinstance(self.forward_module, DistributedDataParallel) and not last:
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def forward_context(self):  # the four methods an AMP loop overrides
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def gradients_ready(self) -> None:  # the step's gradients are summed; the after_backward hooks come next
        pass

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (hook states under their ``state_key``)."""
        state = self.state
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "torch_rng": torch.get_rng_state(),
            "hooks": {hook.state_key: hook.state_dict() for hook in self.hooks},
        }

    def load_state_dict(self, saved: dict) -> None:
        state = self.state
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        state.epoch, state.step_in_epoch = saved["epoch"], saved["step_in_epoch"]
        state.global_step = saved["global_step"]
        if state.step_in_epoch >= state.steps_per_epoch or (  # saved at an epoch's end, or a planned end
                saved.get("max_steps") is not None and state.global_step >= saved["max_steps"]):
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        torch.set_rng_state(saved["torch_rng"])
        hook_states = saved["hooks"]
        for hook in self.hooks:
            if hook.state_key in hook_states:
                hook.load_state_dict(hook_states[hook.state_key])
