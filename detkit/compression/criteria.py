"""Per-channel importance scores for structured pruning, beside Network Slimming's |γ|.

Every function returns ``{BatchNorm name: (C,) float32 scores}``, higher = more important, the same shape as
the |γ| that :mod:`detkit.compression.pruning` reads from each BatchNorm (:func:`group_scores` combines them
over a coupled channel group, for |γ| too):

- ``l1``: L1 norm of each output filter of the conv that feeds the BatchNorm (Li et al., ICLR 2017);
- ``taylor``: |mean over positions of activation × gradient|, averaged over images and batches (Molchanov et
  al., ICLR 2017), at the BatchNorm's output, optionally L2-normalised per layer as in the paper;
- ``apoz``: 1 − the average percentage of zeros (Hu et al. 2016): the fraction of the BatchNorm's outputs
  that are ≤ 0, i.e. those a ReLU would zero (for LeakyReLU/SiLU, those it squashes towards 0).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from detkit.errors import ConfigError

BN_TYPES = (nn.BatchNorm2d,)
CRITERIA = ("bn_gamma", "l1", "taylor", "apoz")


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, BN_TYPES)}
    if not found:
        raise ValueError("the model has no BatchNorm2d layers to score channels for")
    return found


def l1_scores(model: nn.Module) -> dict[str, Tensor]:
    """L1 norm of the filter of each BatchNorm channel: the last Conv2d registered before the BatchNorm with
    as many output channels (detkit's ConvBNAct order; depthwise convs included)."""
    scores, last_conv = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = module
        elif isinstance(module, BN_TYPES) and last_conv is not None \
                and last_conv.out_channels == module.num_features:
            scores[name] = last_conv.weight.detach().abs().flatten(1).sum(1).float().cpu()
    if not scores:
        raise ValueError("no Conv2d → BatchNorm2d pairs found to take filter L1 norms from")
    return scores


class _Recorder:
    """Forward hooks on BatchNorms that keep each output (and, with ``grads``, its gradient)."""

    def __init__(self, batchnorms: dict[str, nn.Module], grads: bool) -> None:
        self.values: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name, grads)) for name, m in batchnorms.items()]

    def _hook(self, name: str, grads: bool):
        def hook(_module, _inputs, output: Tensor) -> None:
            # the value is copied now: detkit's activations run in place on the BatchNorm's output
            self.values[name] = output.detach().float().clone()
            if grads and output.requires_grad:
                # a hook registered before the in-place activation gets the gradient of this (pre-activation) value
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach().float()))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def apoz_scores(model: nn.Module, batches: Iterable[Tensor], forward: Callable | None = None) -> dict[str, Tensor]:
    """1 − APoZ per BatchNorm channel over ``batches`` of images (B, 3, H, W), in eval mode; ``forward``:
    how to run the model on a batch (default ``model.raw_outputs`` if it has one, else the model)."""
    batchnorms = _batchnorms(model)
    was_training = model.training
    model.eval()
    run = forward or getattr(model, "raw_outputs", model)
    recorder = _Recorder(batchnorms, grads=False)
    positive = dict.fromkeys(batchnorms, 0.0)
    counts = dict.fromkeys(batchnorms, 0)
    try:
        for images in batches:
            recorder.values.clear()
            run(images)
            for name, value in recorder.values.items():
                positive[name] = positive[name] + (value > 0).float().sum((0, 2, 3)).cpu()
                counts[name] += value.numel() // value.shape[1]
    finally:
        recorder.remove()
        model.train(was_training)
    if not any(counts.values()):
        raise ValueError("apoz_scores needs at least one batch")
    return {name: positive[name] / counts[name] for name in batchnorms if counts[name]}


def default_loss(model: nn.Module, images: Tensor, targets: list[dict]) -> Tensor:
    """The sum of the detector's training losses (common interface)."""
    return sum(model(images, targets).values())


def taylor_scores(model: nn.Module, batches: Iterable[tuple[Tensor, list[dict]]], normalize: bool = True,
                  loss_fn: Callable[[nn.Module, Tensor, list[dict]], Tensor] = default_loss) -> dict[str, Tensor]:
    """Molchanov's first-order Taylor criterion per BatchNorm channel, over a few calibration batches of
    (images (B, 3, H, W), targets in the detector's format). The model runs in train mode (its losses need
    it); BatchNorm statistics, parameters and gradients are left as they were.

    Args:
        normalize: divide each layer's scores by their L2 norm (the paper's layer-wise normalisation, which
            makes scores comparable across layers for a global threshold).
        loss_fn: the loss whose gradients are used.
    """
    batchnorms = _batchnorms(model)
    saved = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()
    recorder = _Recorder(batchnorms, grads=True)
    totals: dict[str, Tensor] = {}
    images_seen = 0
    try:
        for images, targets in batches:
            recorder.values.clear()
            recorder.grads.clear()
            loss = loss_fn(model, images, targets)
            params = [p for p in model.parameters() if p.requires_grad]
            torch.autograd.grad(loss, params, allow_unused=True)  # fires the gradient hooks; .grad untouched
            for name, grad in recorder.grads.items():
                per_image = (recorder.values[name] * grad).mean((2, 3)).abs().sum(0).cpu()
                totals[name] = totals.get(name, 0) + per_image
            images_seen += len(images)
    finally:
        recorder.remove()
        model.load_state_dict(saved)
        model.train(was_training)
    if not images_seen:
        raise ValueError("taylor_scores needs at least one batch")
    scores = {name: total / images_seen for name, total in totals.items()}
    if normalize:
        scores = {name: s / s.norm().clamp(min=1e-12) for name, s in scores.items()}
    return scores


def group_scores(scores: dict[str, Tensor], batchnorms: Sequence[tuple[str, list[int]]]) -> Tensor:
    """(C,) score of a coupled channel group from per-BatchNorm ``scores``: the largest over its
    BatchNorms, ``batchnorms`` being :class:`~detkit.compression.graph.ChannelGroup`'s (name, idxs) pairs."""
    missing = [name for name, _ in batchnorms if name not in scores]
    if missing:
        raise KeyError(f"no scores for BatchNorms {missing[:5]}")
    return torch.stack([scores[name][idxs] for name, idxs in batchnorms]).amax(0)


def criterion_scores(model: nn.Module, criterion: str,
                     batches: Sequence[tuple[Tensor, list[dict]]] = ()) -> dict[str, Tensor] | None:
    """Per-BatchNorm scores of ``criterion`` (one of :data:`CRITERIA`) for
    :func:`detkit.compression.pruning.prune_model`; None for ``bn_gamma``, which the pruner reads itself.
    ``batches``: (images, targets) calibration batches, needed by ``taylor`` and ``apoz`` (images only)."""
    if criterion not in CRITERIA:
        raise ConfigError(f"pruning criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion == "bn_gamma":
        return None
    if criterion == "l1":
        return l1_scores(model)
    if not batches:
        raise ValueError(f"the {criterion} criterion needs calibration batches (prune.calibration_batches >= 1)")
    if criterion == "apoz":
        return apoz_scores(model, [images for images, _ in batches])
    return taylor_scores(model, batches)
