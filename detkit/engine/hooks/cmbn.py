"""Cross mini-batch normalisation (CmBN, YOLOv4: Bochkovskiy et al. 2020).

With gradient accumulation (``trainer.accumulate = k``) an optimizer step sees k loader batches ("mini-batches"
of one "batch", in darknet's words: ``subdivisions``), but BatchNorm normalises each mini-batch with its own
statistics. YOLOv4's CmBN "collects statistics only between mini-batches within a single batch" (its Figure 4):
mini-batch t of a step is normalised with the statistics of mini-batches 1..t of that step together, and the
running statistics are updated once per step, from all k. What detkit implements, exactly:

- A window is one optimizer step. Mini-batch t is normalised with the mean μ_t and the biased variance σ²_t of
  every value each channel has had in the window so far (mini-batches 1..t, pooled, not averaged per
  mini-batch): y = γ (x − μ_t) / √(σ²_t + ε) + β. The first mini-batch is plain BatchNorm; the k-th uses the
  statistics of the k mini-batches concatenated.
- Gradients flow through mini-batch t's share of μ_t and σ²_t; the earlier mini-batches' shares are constants
  (their backward passes are done, as in darknet).
- At the end of the step the running statistics take one BatchNorm update with the window's statistics
  (running_var with the unbiased variance over the window), and ``num_batches_tracked`` grows by one: what one
  BatchNorm forward on the concatenated batch would do. A skipped step (non-finite loss) updates nothing.
- With k = 1 it is BatchNorm. In eval mode it is BatchNorm (the running statistics).

Statistics are pooled with Chan et al.'s parallel-variance formula, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.engine.hooks.base import Hook
from detkit.errors import ConfigError


class CrossMiniBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training-mode statistics are pooled over a window of mini-batches (module doc):
    :meth:`start_window`, one forward per mini-batch (each (B, C, H, W)), :meth:`end_window`.

    Parameters, buffers and state-dict keys are BatchNorm2d's; the window is not saved (it never outlives an
    optimizer step). With ``track_running_stats`` off, or in eval mode, it is plain BatchNorm2d.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start_window()

    def start_window(self) -> None:
        """Forget the statistics gathered so far: the next mini-batch starts a window."""
        self.window_count = 0  # values per channel in the window
        self._window_mean: Tensor | None = None  # (C,) float32, detached
        self._window_m2: Tensor | None = None  # (C,) Σ (x − mean)² over the window, float32, detached

    @property
    def window_mean(self) -> Tensor | None:
        """(C,) mean of the window's values per channel (None before the first mini-batch)."""
        return self._window_mean

    @property
    def window_var(self) -> Tensor | None:
        """(C,) biased variance of the window's values per channel (None before the first mini-batch)."""
        return None if self._window_m2 is None else self._window_m2 / self.window_count

    @torch.no_grad()
    def end_window(self) -> None:
        """One running-statistics update with the window's statistics (as BatchNorm's update on the window's
        mini-batches concatenated), then :meth:`start_window`."""
        if self.window_count > 1 and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = self._window_m2 / (self.window_count - 1)
            self.running_mean.mul_(1 - factor).add_(self._window_mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        self.start_window()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.track_running_stats:
            return super().forward(x)
        self._check_input_dim(x)
        n = x.numel() // x.shape[1]
        if self.window_count == 0:  # the window's first mini-batch: BatchNorm's own kernel, no running update
            with torch.no_grad():
                var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
            self.window_count, self._window_mean, self._window_m2 = n, mean, var * n
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        seen, total = self.window_count, self.window_count + n
        delta = mean - self._window_mean
        mean = self._window_mean + delta * (n / total)
        m2 = self._window_m2 + var * n + delta.square() * (seen * n / total)
        self.window_count, self._window_mean, self._window_m2 = total, mean.detach(), m2.detach()
        scale = torch.rsqrt(m2 / total + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        return (x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


def convert_cmbn(model: nn.Module) -> list[CrossMiniBatchNorm2d]:
    """Make every plain ``nn.BatchNorm2d`` of ``model`` (exactly that class: not SyncBatchNorm or other
    subclasses) a :class:`CrossMiniBatchNorm2d`, in place, and return them. The modules keep their identity:
    only their class changes, so parameters (the optimizer's), buffers, state-dict keys, forward hooks and the
    references other hooks hold (Network Slimming's list of BatchNorms) stay valid."""
    converted = []
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CrossMiniBatchNorm2d
            module.start_window()
        if isinstance(module, CrossMiniBatchNorm2d):
            converted.append(module)
    return converted


def restore_batchnorm(model: nn.Module) -> None:
    """Undo :func:`convert_cmbn`: every CrossMiniBatchNorm2d of ``model`` becomes a plain BatchNorm2d again."""
    for module in model.modules():
        if type(module) is CrossMiniBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
            for name in ("window_count", "_window_mean", "_window_m2"):
                delattr(module, name)


class CmBNHook(Hook):
    """CmBN (module doc) over each optimizer step's ``trainer.accumulate`` loader batches: converts the model's
    BatchNorm2d layers before training (:func:`convert_cmbn`), opens a window before every step, updates the
    running statistics once after its backward passes, and restores plain BatchNorm2d after training.
    ``enabled=False``: the hook does nothing.

    Runs after the EMA copy is made (priority 10: the EMA model keeps plain BatchNorm2d; its weights and
    statistics are averaged as before) and after Network Slimming has traced the model (60). In a data-parallel
    run each process pools its own share of the batches (as BatchNorm does without ``trainer.sync_bn``, which
    CmBN does not combine with).
    """

    priority = 70

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = bool(enabled)
        self.norms: list[CrossMiniBatchNorm2d] = []

    def before_train(self, trainer) -> None:
        if not self.enabled:
            return
        self.norms = convert_cmbn(trainer.model)
        if not self.norms:
            synced = any(isinstance(m, nn.SyncBatchNorm) for m in trainer.model.modules())
            raise ConfigError(f"trainer.cmbn=true: {type(trainer.model).__name__} has no BatchNorm2d layer to pool "
                              "statistics in" + (" (trainer.sync_bn made them SyncBatchNorm: use one or the other)"
                                                 if synced else ""))

    def before_step(self, trainer) -> None:
        for module in self.norms:
            module.start_window()

    def after_backward(self, trainer) -> None:
        for module in self.norms:
            module.end_window()

    def after_train(self, trainer) -> None:
        if self.norms:
            restore_batchnorm(trainer.model)
            self.norms = []
