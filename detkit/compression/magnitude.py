"""Unstructured magnitude pruning (Han et al., NIPS 2015) and the DSD schedule (Han et al., ICLR 2017).

Weights of the chosen conv/linear layers whose magnitude is below a threshold are set to zero; a boolean
mask per weight keeps them at zero during fine-tuning: :class:`MagnitudePruningHook` multiplies the weights
by their masks after every optimizer step (momentum and weight decay would otherwise revive them). The
model stays a plain ``nn.Module`` (no ``torch.nn.utils.prune`` parametrisation), so a checkpoint of a pruned
model is an ordinary state dict that loads with ``torch.load(..., weights_only=True)`` into the unpruned
architecture; the masks travel in the hook's ``state_dict`` for an exact resume.

DSD (dense → sparse → dense) is the same hook with an end: ``MagnitudePruningHook(sparsity, start_epoch=d,
end_epoch=d + s)`` trains dense for ``d`` epochs, prunes and trains sparse for ``s`` epochs, then releases the
masks so the pruned weights (restarting from zero) are trained again for the remaining epochs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from detkit.engine.hooks import Hook
from detkit.engine.trainer import Trainer

SCOPES = ("layer", "global")


def prunable_layers(model: nn.Module, types: tuple[type, ...] = (nn.Conv2d, nn.Linear),
                    exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The conv/linear modules whose weights magnitude pruning may zero, by qualified name; modules whose name
    starts with one of ``exclude`` (e.g. a detection head's output convs) are left out."""
    exclude = tuple(exclude)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, types) and not (exclude and name.startswith(exclude))}


def _threshold(magnitudes: Tensor, sparsity: float) -> Tensor:
    """The value at or below which a ``sparsity`` fraction of ``magnitudes`` (1-D) lies."""
    k = int(round(sparsity * magnitudes.numel()))
    if k == 0:
        return magnitudes.new_tensor(-1.0)
    return magnitudes.kthvalue(k).values


@torch.no_grad()
def magnitude_masks(model: nn.Module, sparsity: float | Mapping[str, float], scope: str = "layer",
                    exclude: Iterable[str] = ()) -> dict[str, Tensor]:
    """Boolean keep-masks (same shape as each weight) that zero the smallest-magnitude weights.

    Args:
        sparsity: fraction of weights to zero in [0, 1), one value for every layer or ``{layer name: value}``
            (layers not named are left dense; only with ``scope="layer"``).
        scope: ``"layer"``: each layer loses its own ``sparsity`` fraction; ``"global"``: one threshold over
            all layers' magnitudes, so layers with many small weights lose more.
        exclude: module-name prefixes to keep dense (see :func:`prunable_layers`).

    Returns:
        ``{module name: bool tensor}``, True where the weight is kept.
    """
    if scope not in SCOPES:
        raise ValueError(f"magnitude pruning scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    layers = prunable_layers(model, exclude=exclude)
    per_layer = dict(sparsity) if isinstance(sparsity, Mapping) else dict.fromkeys(layers, float(sparsity))
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise ValueError(f"sparsity names layers the model has no prunable conv/linear for: {unknown[:5]}")
    for name, value in per_layer.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value} for layer {name!r}")
    if scope == "global":
        if isinstance(sparsity, Mapping):
            raise ValueError("scope='global' takes one sparsity value, not a per-layer mapping")
        everything = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
        cut = _threshold(everything, float(sparsity))
        return {name: m.weight.abs() > cut for name, m in layers.items()}
    return {name: layers[name].weight.abs() > _threshold(layers[name].weight.abs().flatten(), value)
            for name, value in per_layer.items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, the weights of ``model`` where ``masks`` (from :func:`magnitude_masks`) are False."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"mask for {name!r}, which is not a module of the model")
        weight = modules[name].weight
        if weight.shape != mask.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}")
        weight.mul_(mask.to(weight.device, weight.dtype))


def prune_by_magnitude(model: nn.Module, sparsity: float | Mapping[str, float], scope: str = "layer",
                       exclude: Iterable[str] = ()) -> dict[str, Tensor]:
    """Compute the masks (:func:`magnitude_masks`), zero the weights in place and return the masks."""
    masks = magnitude_masks(model, sparsity, scope, exclude)
    apply_masks(model, masks)
    return masks


def layer_sparsity(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, tuple[int, int]]:
    """``{layer name: (zero weights, all weights)}`` for each conv/linear layer."""
    return {name: (int((m.weight == 0).sum()), m.weight.numel())
            for name, m in prunable_layers(model, exclude=exclude).items()}


def sparsity_table(model: nn.Module, exclude: Iterable[str] = ()) -> str:
    """A text table of :func:`layer_sparsity`: one row per layer (name, shape, weights, zeros, % zero) and a
    total row."""
    counts = layer_sparsity(model, exclude)
    modules = dict(model.named_modules())
    width = max([len(n) for n in counts] + [5])
    lines = [f"{'layer':<{width}}  {'shape':<20} {'weights':>10} {'zeros':>10} {'sparsity':>9}"]
    for name, (zeros, total) in counts.items():
        shape = "x".join(map(str, modules[name].weight.shape))
        lines.append(f"{name:<{width}}  {shape:<20} {total:>10} {zeros:>10} {100 * zeros / total:>8.1f}%")
    zeros = sum(z for z, _ in counts.values())
    total = max(sum(t for _, t in counts.values()), 1)
    lines.append(f"{'total':<{width}}  {'':<20} {total:>10} {zeros:>10} {100 * zeros / total:>8.1f}%")
    return "\n".join(lines)


class MagnitudePruningHook(Hook):
    """Prune by magnitude at the start of epoch ``start_epoch`` and keep the pruned weights at zero after
    every optimizer step until epoch ``end_epoch`` (None: to the end of the run); ``state.eval_model`` (the
    EMA copy), if any, is masked too.

    ``start_epoch=0, end_epoch=None`` is prune-then-fine-tune; ``start_epoch=d, end_epoch=d + s`` is DSD
    (see :func:`dsd_hook`). Args as :func:`magnitude_masks`; ``masks``: keep-masks already computed (e.g. by
    :func:`prune_by_magnitude` before fine-tuning), used instead of pruning at ``start_epoch``.
    """

    def __init__(self, sparsity: float | Mapping[str, float], scope: str = "layer", exclude: Iterable[str] = (),
                 start_epoch: int = 0, end_epoch: int | None = None,
                 masks: Mapping[str, Tensor] | None = None) -> None:
        if end_epoch is not None and end_epoch <= start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be after start_epoch ({start_epoch})")
        self.sparsity, self.scope, self.exclude = sparsity, scope, tuple(exclude)
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.masks: dict[str, Tensor] | None = dict(masks) if masks is not None else None

    def sparse_phase(self, epoch: int) -> bool:
        """Whether ``epoch`` trains with the masks on."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def before_train(self, trainer: Trainer) -> None:
        self.before_epoch(trainer)

    def before_epoch(self, trainer: Trainer) -> None:
        if not self.sparse_phase(trainer.state.epoch):
            self.masks = None  # DSD's final dense phase: the pruned weights train again from zero
            return
        if self.masks is None:
            self.masks = prune_by_magnitude(trainer.model, self.sparsity, self.scope, self.exclude)
        else:
            apply_masks(trainer.model, self.masks)

    def after_step(self, trainer: Trainer) -> None:
        if self.masks is not None:
            apply_masks(trainer.model, self.masks)
            # the EMA weights are what evaluation and checkpoints use: their pruned entries must be exact zeros
            if trainer.state.eval_model is not trainer.model:
                apply_masks(trainer.state.eval_model, self.masks)

    def state_dict(self) -> dict:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self.masks = state.get("masks")


def dsd_hook(sparsity: float, dense_epochs: int, sparse_epochs: int, scope: str = "layer",
             exclude: Iterable[str] = ()) -> MagnitudePruningHook:
    """Dense-Sparse-Dense: ``dense_epochs`` dense, then ``sparse_epochs`` pruned to ``sparsity``, then dense
    again for the rest of the run (the paper re-trains that last phase at a tenth of the learning rate)."""
    if dense_epochs < 0 or sparse_epochs < 1:
        raise ValueError(f"DSD needs dense_epochs >= 0 and sparse_epochs >= 1, got {dense_epochs}, {sparse_epochs}")
    return MagnitudePruningHook(sparsity, scope, exclude, start_epoch=dense_epochs,
                                end_epoch=dense_epochs + sparse_epochs)
