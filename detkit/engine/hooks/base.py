"""The hook interface of the training loop."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from detkit.engine.trainer import Trainer


class Hook:
    """Called by :class:`~detkit.engine.trainer.Trainer` at fixed points; override what you need.

    Hooks run in increasing ``priority`` (ties in the order given). ``name`` is the hook's entry in a
    checkpoint's ``hooks`` (default: the class name in snake case; two hooks of one run need distinct keys);
    ``state_dict`` is saved there so a resumed run restores the hook. Hooks share the loop's
    :class:`~detkit.engine.state.TrainState` (``trainer.state``) and talk to each other only through it or
    through methods a hook offers. ``main_process_only`` hooks are left out of the other processes of a
    data-parallel run.
    """

    priority: int = 50
    main_process_only: bool = False
    name: str | None = None

    @property
    def state_key(self) -> str:
        return self.name or re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def before_train(self, trainer: Trainer) -> None: ...
    def before_epoch(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...

    def transform_images(self, trainer: Trainer, images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """The images the training forward pass runs on instead of one loader batch's ``images`` ((B, 3, H, W),
        0–1 RGB, on the device in the trainer's memory format; ``targets`` as the model takes them); called
        before the forward, outside autocast. Default: ``images`` unchanged; e.g. SAT's adversarial images."""
        return images

    def extra_losses(self, trainer: Trainer, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Loss terms to add to the model's, computed right after its forward pass on ``images`` (under the
        same autocast); e.g. distillation, which reads the student's outputs through forward hooks."""
        return {}

    def check_loss(self, trainer: Trainer, losses: dict[str, torch.Tensor], targets: list[dict]) -> bool:
        """False skips the optimizer step (no backward, no update; the step still counts)."""
        return True

    def after_backward(self, trainer: Trainer) -> None:
        """Gradients are complete (and unscaled); the optimizer has not stepped yet."""

    def after_step(self, trainer: Trainer) -> None: ...
    def after_epoch(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...

    def after_plan(self, trainer: Trainer) -> None:
        """The run's length changed (:meth:`Trainer.plan`): ``state.max_steps`` and ``state.epochs``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
