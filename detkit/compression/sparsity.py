"""Network Slimming's sparsity training (Liu et al., ICCV 2017): an L1 penalty s·Σ|γ| on the BatchNorm
scales of the prunable channels, applied as its subgradient s·sign(γ) added to γ's gradient after each
backward pass, so that unimportant channels' γ are driven towards zero and can be pruned with little loss.

Enabled from the training config (``python tools/train.py +compress=sparsity sparsity.s=1e-4``), which makes
:func:`detkit.app.train.train` install :class:`SparsityHook` through :func:`sparsity_hook`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from detkit.engine.hooks import Hook
from detkit.engine.trainer import Trainer

SCHEDULES = ("constant", "linear", "cosine")


def sparsity_factor(progress: float, schedule: str = "constant", final_factor: float = 0.0) -> float:
    """Multiplier of ``s`` at ``progress`` ∈ [0, 1] of the run: 1 (``constant``), or decaying from 1 to
    ``final_factor`` linearly (``linear``) or along a half cosine (``cosine``); a decaying penalty lets the
    surviving channels recover accuracy at the end of the run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"sparsity.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - (1.0 - final_factor) * progress
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SparsityHook(Hook):
    """Add s(t)·sign(γ) to the γ gradient of every prunable BatchNorm (see
    :func:`detkit.compression.graph.prunable_batchnorms`) after each backward pass; log the γ histogram and
    the fraction of |γ| below ``small`` to TensorBoard (``log_dir``) every ``hist_every`` epochs.

    Args:
        s: penalty weight (the paper uses 1e-4 to 1e-5 with SGD).
        schedule, final_factor: how s changes over the run (:func:`sparsity_factor`).
        log_dir: TensorBoard folder (None: no logging).
        batchnorms: the BatchNorms to penalise (default: found by tracing the model in ``before_train``).
    """

    priority = 60  # after the other hooks' gradients, before clipping

    def __init__(self, s: float, schedule: str = "constant", final_factor: float = 0.0,
                 log_dir: str | Path | None = None, hist_every: int = 1, small: float = 1e-2,
                 batchnorms: list[nn.Module] | None = None) -> None:
        if not s >= 0:
            raise ValueError(f"sparsity.s must be >= 0, got {s}")
        sparsity_factor(0.0, schedule, final_factor)  # validates the schedule now, not after the first step
        self.s, self.schedule, self.final_factor = float(s), schedule, float(final_factor)
        self.log_dir, self.hist_every, self.small = log_dir, max(int(hist_every), 1), small
        self.batchnorms = batchnorms
        self.writer = None

    def before_train(self, trainer: Trainer) -> None:
        if self.batchnorms is None:
            from detkit.compression.graph import prunable_batchnorms

            self.batchnorms = prunable_batchnorms(trainer.model)
        if not self.batchnorms:
            raise ValueError(f"sparsity training: {type(trainer.model).__name__} has no prunable BatchNorm")
        if self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))
            self._log(trainer)

    def current_s(self, trainer: Trainer) -> float:
        progress = trainer.state.global_step / max(trainer.state.total_steps, 1)
        return self.s * sparsity_factor(progress, self.schedule,
                                        self.final_factor)

    @torch.no_grad()
    def after_backward(self, trainer: Trainer) -> None:
        s = self.current_s(trainer)
        for bn in self.batchnorms:
            if bn.weight.grad is not None:
                bn.weight.grad.add_(torch.sign(bn.weight), alpha=s)

    def gammas(self) -> torch.Tensor:
        """All penalised |γ|, concatenated (1-D)."""
        return torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in self.batchnorms])

    def _log(self, trainer: Trainer) -> None:
        gammas = self.gammas()
        self.writer.add_histogram("sparsity/gamma", gammas, trainer.state.global_step)
        self.writer.add_scalar("sparsity/fraction_small", (gammas < self.small).float().mean().item(),
                               trainer.state.global_step)
        self.writer.add_scalar("sparsity/s", self.current_s(trainer), trainer.state.global_step)
        self.writer.flush()

    def after_epoch(self, trainer: Trainer) -> None:
        if self.writer is not None and (trainer.state.epoch + 1) % self.hist_every == 0:
            self._log(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


def sparsity_hook(cfg: Mapping | None, out_dir: str | Path | None) -> list[Hook]:
    """The hooks the training config's ``sparsity`` section asks for: ``[SparsityHook]`` when ``sparsity.s``
    is set, else ``[]``; histograms go to ``out_dir/tb`` (None: not logged, as on the other processes of a
    distributed run)."""
    if not cfg or cfg["s"] is None:
        return []
    log_dir = None if out_dir is None else Path(out_dir) / "tb"
    return [SparsityHook(cfg["s"], cfg["schedule"], cfg["final_factor"], log_dir, cfg["hist_every"], cfg["small"])]
