"""Self-adversarial training (SAT, YOLOv4: Bochkovskiy et al. 2020, "bag of freebies").

With probability ``prob`` a loader batch is first attacked by the detector itself: a forward/backward pass
computes the gradient of the detection loss with respect to the input pixels, leaving the weights alone, and
the images are moved up that gradient (FGSM steps) so that the objects are harder to see; the normal training
step then runs on the altered images with the original boxes. YOLOv4's description: "the neural network alters
the original image instead of the network weights [...] creating the deception that there is no desired object
on the image"; darknet (``adversarial_lr``) descends the loss of empty targets instead, detkit ascends the loss
of the true ones: both push the objects' confidence down.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from detkit.engine.hooks.base import Hook
from detkit.errors import ConfigError


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, training-mode BatchNorms (every ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm and
    :class:`~detkit.engine.hooks.cmbn.CrossMiniBatchNorm2d`) still normalise with the batch's statistics but
    leave their running statistics (and CmBN its window) untouched; eval-mode ones are unaffected."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # training mode then means batch statistics and no update
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def self_adversarial_images(model: nn.Module, images: Tensor, targets: list[dict], eps: float, steps: int = 1,
                            forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                            loss_scale: float = 1.0) -> Tensor:
    """SAT's first stage: ``images`` moved to raise the detection loss of ``targets`` (gradient ascent), within
    ε of the original.

    ``steps`` iterations of x ← clip(x + ε/steps · sign(∂L/∂x)), where L is the sum of ``model(x, targets)``'s
    losses and clip projects onto the L∞ ball of radius ``eps`` around ``images`` and onto [0, 1]. The model
    is left as it was: only the input's gradient is computed (no parameter's ``.grad`` is touched) and
    BatchNorm running statistics are frozen (:func:`frozen_batchnorm_stats`); other training-mode randomness
    (dropout, proposal sampling) is drawn as in any forward pass.

    Args:
        model: a detector in training mode: ``model(images, targets)`` → dict of scalar losses.
        images: (B, 3, H, W) 0–1 RGB, float, any memory format.
        targets: the batch's targets as ``model`` takes them (``boxes`` xyxy in absolute pixels, ``labels``).
        eps: the L∞ radius, in 0–1 pixel units (0.03 ≈ 8/255).
        steps: the number of FGSM iterations (≥ 1).
        forward_context: a callable giving the context each forward runs in (the trainer's autocast).
        loss_scale: the loss is multiplied by this before differentiation (the fp16 loss scale, so that small
            input gradients do not underflow in float16; only their sign is used).

    Returns:
        (B, 3, H, W) detached images of ``images``' dtype and memory format, ‖x' − images‖∞ ≤ eps, in [0, 1];
        ``images`` itself where the loss or its gradient is not finite.
    """
    if steps < 1:
        raise ValueError(f"SAT needs steps >= 1, got {steps}")
    original = images.detach()
    low, high = (original - eps).clamp(min=0.0), (original + eps).clamp(max=1.0)
    step = eps / steps
    adversarial = original.clone()
    with frozen_batchnorm_stats(model), torch.enable_grad():
        for _ in range(steps):
            adversarial.requires_grad_(True)
            with forward_context():
                loss = sum(model(adversarial, targets).values())
            if not torch.isfinite(loss):
                return original
            (grad,) = torch.autograd.grad(loss * loss_scale, adversarial, allow_unused=True)
            if grad is None:
                return original
            with torch.no_grad():  # an overflowing fp16 gradient keeps its sign; a NaN one moves nothing
                moved = adversarial + step * torch.nan_to_num(grad, nan=0.0).sign()
                adversarial = torch.minimum(torch.maximum(moved, low), high)
    return adversarial.detach()


class SATHook(Hook):
    """Self-adversarial training (:func:`self_adversarial_images`) on a random ``prob`` share of the loader
    batches; ``enabled=False``: the hook does nothing.

    Whether a batch is attacked depends only on (``seed``, optimizer step, batch index within the step), so every
    process of a data-parallel run makes the same draw (their SyncBatchNorms stay in step) and a resumed run the
    same draws as an uninterrupted one. The attack runs through ``trainer.model`` itself (not its DDP or
    ``torch.compile`` wrapper: no gradient synchronisation is due), under the trainer's autocast and fp16 loss
    scale. Its checkpoint entry counts the attacked batches.

    Args:
        prob: probability that a loader batch is attacked, in [0, 1].
        eps: L∞ radius of the perturbation, in 0–1 pixel units, > 0.
        steps: FGSM iterations of ``eps / steps`` each, ≥ 1.
    """

    priority = 50

    def __init__(self, enabled: bool = False, prob: float = 0.5, eps: float = 0.03, steps: int = 1,
                 seed: int = 0) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"trainer.sat.prob must be in [0, 1], got {prob}")
        if not eps > 0:
            raise ConfigError(f"trainer.sat.eps must be > 0 (an L∞ radius in 0-1 pixel units), got {eps}")
        if int(steps) != steps or steps < 1:
            raise ConfigError(f"trainer.sat.steps must be an integer >= 1, got {steps}")
        self.enabled, self.prob, self.eps, self.steps = bool(enabled), float(prob), float(eps), int(steps)
        self.seed = seed
        self.batch_index = 0  # within the current optimizer step
        self.attacked = 0

    def attacks(self, step: int, index: int) -> bool:
        """Whether the ``index``-th loader batch of optimizer step ``step`` is attacked."""
        return random.Random(f"sat:{self.seed}:{step}:{index}").random() < self.prob

    def before_step(self, trainer) -> None:
        self.batch_index = 0

    def transform_images(self, trainer, images: Tensor, targets: list[dict]) -> Tensor:
        index, self.batch_index = self.batch_index, self.batch_index + 1
        if not self.enabled or not self.attacks(trainer.state.global_step, index):
            return images
        scaler = getattr(trainer, "scaler", None)  # AMPTrainer's; enabled for fp16 only
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        self.attacked += 1
        adversarial = self_adversarial_images(trainer.model, images, targets, self.eps, self.steps,
                                              trainer.forward_context, scale)
        return adversarial.contiguous(memory_format=trainer.memory_format)

    def state_dict(self) -> dict:
        return {"attacked": self.attacked}

    def load_state_dict(self, state: dict) -> None:
        self.attacked = int(state.get("attacked", 0))
