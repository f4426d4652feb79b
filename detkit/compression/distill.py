"""Knowledge distillation for dense detectors, as a trainer hook: a frozen teacher guides a student.

:class:`DistillHook` runs the teacher (eval mode, no gradient) on each training batch and adds weighted loss
terms to the student's own (:mod:`detkit.compression.distill_losses`):

- ``loss_kd``: logit distillation at a temperature (softmax KL for SSD, binary KL to soft targets for YOLO);
- ``loss_bounded_box``: the teacher-bounded box regression of Chen et al. (NeurIPS 2017);
- ``loss_imitation``: Wang et al.'s (CVPR 2019) feature imitation near objects, through trainable 1×1
  adaptation convs, one per level, from the student's width to the teacher's.

The student's outputs are read through forward hooks on its head modules
(:mod:`detkit.compression.distill_adapters`), so the training loop is the ordinary one. Teacher and student
may differ in width (a slimmed student from its unpruned parent) but must predict the same anchors and
classes. ``tools/distill.py`` calls :func:`distill`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from detkit.app.evaluate import load_trained
from detkit.app.train import train
from detkit.compression.distill_adapters import DenseAdapter, DistillationError, check_same_layout, dense_adapter
from detkit.compression.distill_losses import (
    bounded_regression_loss,
    imitation_loss,
    imitation_mask,
    logit_kd_loss,
)
from detkit.engine import distributed
from detkit.engine.hooks import Hook
from detkit.engine.trainer import Trainer, model_to

__all__ = ["DistillHook", "adaptation_layers", "distill"]


def adaptation_layers(student_channels: list[int], teacher_channels: list[int]) -> nn.ModuleList:
    """Per level a 1×1 conv from the student's channels to the teacher's; identity where they are equal, so a
    student of the teacher's width starts imitating its own features unchanged."""
    layers = nn.ModuleList()
    for c_s, c_t in zip(student_channels, teacher_channels):
        conv = nn.Conv2d(c_s, c_t, 1)
        if c_s == c_t:
            with torch.no_grad():
                conv.weight.copy_(torch.eye(c_t).view(c_t, c_t, 1, 1))
                conv.bias.zero_()
        layers.append(conv)
    return layers


class DistillHook(Hook):
    """Distill a frozen ``teacher`` into the trainer's model; a term whose weight is 0 is not computed. The
    defaults (feature imitation only) are what helped a width-8 compact YOLOv3 most (configs/compress/distill.yaml).

    Args:
        teacher: a trained detector of the student's family (YOLOv3 or SSD class), with the same anchors and
            classes; it is moved to the trainer's device, put in eval mode and frozen.
        kd_weight, temperature: logit distillation (:func:`~detkit.compression.distill_losses.logit_kd_loss`).
        box_weight, margin, box_iou_threshold: teacher-bounded regression
            (:func:`~detkit.compression.distill_losses.bounded_regression_loss`).
        imitation_weight, psi: feature imitation (:func:`~detkit.compression.distill_losses.imitation_mask`).
        class_names: the teacher's classes; checked against the training set's when both are known.
        grad_clip_norm: clips the adaptation convs' gradient norm (the trainer's ``trainer.grad_clip_norm``).

    The adaptation convs train with an optimizer of their own, of the trainer's optimizer's class and
    settings at the trainer's current learning rate (no weight decay); they are not added to the trainer's
    optimizer because a resumed run loads that optimizer's state before any hook runs, so an extra param
    group would not fit. Their weights and optimizer state are this hook's :meth:`state_dict`, so ``resume``
    continues exactly.
    """

    def __init__(self, teacher: nn.Module, kd_weight: float = 0.0, temperature: float = 2.0,
                 box_weight: float = 0.0, margin: float = 0.0, box_iou_threshold: float = 0.5,
                 imitation_weight: float = 0.005, psi: float = 0.5, class_names: list[str] | None = None,
                 grad_clip_norm: float | None = None) -> None:
        weights = {"kd_weight": kd_weight, "box_weight": box_weight, "imitation_weight": imitation_weight}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise DistillationError(f"distillation weights must be ≥ 0 with at least one > 0, got {weights}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_weight, self.temperature = kd_weight, temperature
        self.box_weight, self.margin, self.box_iou_threshold = box_weight, margin, box_iou_threshold
        self.imitation_weight, self.psi = imitation_weight, psi
        self.class_names = list(class_names) if class_names is not None else None
        self.grad_clip_norm = grad_clip_norm
        self.student_view: DenseAdapter | None = None
        self.teacher_view: DenseAdapter | None = None
        self.adaptation: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    def before_train(self, trainer: Trainer) -> None:
        self._check_classes(trainer)
        if self.student_view is None:
            self.student_view = dense_adapter(trainer.model)
            self.teacher_view = dense_adapter(self.teacher)
            # per-anchor terms need the same anchors; feature imitation only the same family (and strides)
            check_same_layout(self.teacher_view, self.student_view,
                              family_only=self.kd_weight == 0 and self.box_weight == 0)
        model_to(self.teacher, trainer.device, trainer.memory_format == torch.channels_last).eval()
        if self.imitation_weight > 0 and self.adaptation is None:
            student_c, teacher_c = self.student_view.feature_channels(), self.teacher_view.feature_channels()
            if len(student_c) != len(teacher_c):
                raise DistillationError(f"feature imitation needs as many levels in the student "
                                        f"({len(student_c)}) as in the teacher ({len(teacher_c)})")
            with torch.random.fork_rng(devices=[]):  # leaves the training's random stream as without the hook
                torch.manual_seed(0)
                self.adaptation = adaptation_layers(student_c, teacher_c).to(trainer.device)
            settings = {k: v for k, v in trainer.optimizer.param_groups[0].items() if k != "params"}
            self.optimizer = type(trainer.optimizer)([{**settings, "params": list(self.adaptation.parameters()),
                                                       "weight_decay": 0.0}])
            if self._pending:
                self.adaptation.load_state_dict(self._pending["adaptation"])
                self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None

    def _check_classes(self, trainer: Trainer) -> None:
        names = getattr(trainer.loader.dataset, "class_names", None)
        if self.class_names is not None and names is not None and list(names) != self.class_names:
            raise DistillationError(f"the teacher was trained on classes {self.class_names} but the training "
                                    f"set has {list(names)}")

    def before_step(self, trainer: Trainer) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def extra_losses(self, trainer: Trainer, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        student = self.student_view.outputs(images)
        self.teacher.eval()
        with torch.no_grad():
            self.teacher_view.run(images)
            teacher = self.teacher_view.outputs(images)
        if (self.kd_weight > 0 or self.box_weight > 0) and student.logits.shape != teacher.logits.shape:
            raise DistillationError(f"teacher predicts {tuple(teacher.logits.shape)} logits and student "
                                    f"{tuple(student.logits.shape)} for the same images: the head layouts differ")
        gt = [t["boxes"] for t in targets]
        losses = {}
        if self.kd_weight > 0:
            kd = logit_kd_loss(student.logits, teacher.logits, self.temperature, student.softmax,
                               student.objectness, teacher.objectness)
            losses["loss_kd"] = self.kd_weight * kd
        if self.box_weight > 0:
            bounded = bounded_regression_loss(student.boxes, teacher.boxes, student.priors, gt, self.margin,
                                              self.box_iou_threshold)
            losses["loss_bounded_box"] = self.box_weight * bounded
        if self.imitation_weight > 0:
            adapted = [conv(f) for conv, f in zip(self.adaptation, student.features)]
            num_cells = sum(f.shape[-2] * f.shape[-1] for f in student.features)
            mask = imitation_mask(student.priors, student.cells, num_cells, gt, self.psi)
            losses["loss_imitation"] = self.imitation_weight * imitation_loss(adapted, teacher.features, mask)
        return losses

    def after_backward(self, trainer: Trainer) -> None:
        if self.optimizer is None:
            return
        params = [p for p in self.adaptation.parameters() if p.grad is not None]
        if not params:
            return
        world = distributed.current().size
        if world > 1:  # the adaptation convs are outside DistributedDataParallel: average their gradients here
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world
        if self.grad_clip_norm:
            nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = trainer.lr
        self.optimizer.step()

    def after_train(self, trainer: Trainer) -> None:
        for view in (self.student_view, self.teacher_view):
            if view is not None:
                view.remove()
        self.student_view = self.teacher_view = None

    def state_dict(self) -> dict:
        if self.adaptation is None:
            return {}
        return {"adaptation": self.adaptation.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None


def distill(cfg: DictConfig, out_dir: str | Path, extra_hooks: list[Hook] = ()) -> dict:
    """Train ``cfg`` (a train config with ``teacher``, a checkpoint path, and ``distill``, the
    :class:`DistillHook` settings) into ``out_dir`` with the teacher's guidance, plus ``extra_hooks``; returns
    the final validation metrics, as :func:`detkit.app.train.train`."""
    if not cfg.get("teacher"):
        raise DistillationError("distillation needs a teacher checkpoint: teacher=PATH/TO/best.pt")
    teacher, _, state = load_trained(cfg.teacher, cfg.device)
    print(f"teacher {cfg.teacher}: {type(teacher).__name__}, "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters")
    hook = DistillHook(teacher, **cfg.distill, class_names=state["class_names"],
                       grad_clip_norm=cfg.trainer.grad_clip_norm)
    return train(cfg, out_dir, extra_hooks=[hook, *extra_hooks])
