"""Network Slimming's channel pruning (Liu et al., ICCV 2017), physical and dependency-aware.

:func:`prune_model` removes, in place, the lowest-scoring channels over all dependency groups
(:mod:`detkit.compression.graph`; ``ratio`` of them or those scoring ≤ ``threshold``) within per-group limits,
folding each removed channel's constant output into its readers. The rule and its reasons: docs/pruning.md.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from detkit.compression.criteria import group_scores
from detkit.compression.graph import (
    ChannelGroup,
    batchnorms_after,
    channel_groups,
    dependency_graph,
    example_images,
    trace_size,
)

_IN_CHANNEL_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


@dataclass
class PruningResult:
    """What :func:`prune_model` did.

    Attributes:
        channel_spec: ``[[conv_name, kept_channels], ...]`` for each pruned group's root convolution, the
            data :func:`detkit.compression.channels.apply_channel_spec` rebuilds the architecture from.
        prunable, removed: channel counts over all prunable groups.
        skipped: ``(root, reason)`` of the groups left alone.
        groups: ``(root, channels, kept)`` of every prunable group.
    """

    channel_spec: list[list] = field(default_factory=list)
    prunable: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    groups: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        return self.removed / max(self.prunable, 1)


def _kept_count(wanted: int, channels: int, min_channels: int, max_layer_ratio: float, round_to: int) -> int:
    floor = max(min(min_channels, channels), math.ceil(channels * (1.0 - max_layer_ratio)), 1)
    kept = max(wanted, floor)
    if round_to > 1:
        kept = math.ceil(kept / round_to) * round_to
    return min(kept, channels)


def plan_pruning(model: nn.Module, groups: list[ChannelGroup], ratio: float = 0.5, threshold: float | None = None,
                 min_channels: int = 8, max_layer_ratio: float = 0.9, round_to: int = 1,
                 scores: Mapping[str, Tensor] | None = None) -> dict[str, list[int]]:
    """{root conv name: sorted channel indices to remove} for the prunable ``groups`` (see module doc);
    groups that lose nothing are left out. ``scores``: ``{BatchNorm name: (C,) score}`` from
    :mod:`detkit.compression.criteria` to rank channels by instead of |γ| (a group takes the largest over its
    BatchNorms, as for γ)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune.ratio must be in [0, 1), got {ratio}")
    if not 0.0 <= max_layer_ratio < 1.0:
        raise ValueError(f"prune.max_layer_ratio must be in [0, 1), got {max_layer_ratio}")
    if min_channels < 1 or round_to < 1:
        raise ValueError(f"prune.min_channels and prune.round_to must be >= 1, got {min_channels}, {round_to}")
    prunable = [g for g in groups if g.prunable]
    if not prunable:
        return {}
    if scores is None:  # Network Slimming: BatchNorm |γ|
        modules = dict(model.named_modules())
        scores = {bn: modules[bn].weight.detach().abs() for g in prunable for bn, _ in g.batchnorms}
    ranked = [group_scores(scores, g.batchnorms).float().cpu() for g in prunable]

    def kept_counts(limit: float) -> list[int]:
        return [_kept_count(int((score > limit).sum()), g.channels, min_channels, max_layer_ratio, round_to)
                for g, score in zip(prunable, ranked)]

    if threshold is None:
        # The lowest threshold that removes ratio of the channels once the per-group limits have kept some back:
        # a binary search over the sorted scores (the removed count only grows with the threshold).
        everything = torch.cat(ranked).sort().values
        total, target = everything.numel(), int(round(ratio * everything.numel()))
        low, high = target - 1, total - 1
        while low < high:
            middle = (low + high) // 2
            if middle >= 0 and total - sum(kept_counts(float(everything[middle]))) >= target:
                high = middle
            else:
                low = middle + 1
        threshold = float(everything[low]) if target > 0 else -math.inf
    plan = {}
    for group, score, kept in zip(prunable, ranked, kept_counts(threshold)):
        if kept < group.channels:
            order = torch.argsort(score, descending=True, stable=True)
            plan[group.root] = sorted(order[kept:].tolist())
    return plan


def _readers_and_batchnorms(graph: tp.DependencyGraph, modules: dict[str, nn.Module], plan: dict[str, list[int]]):
    names = {m: n for n, m in modules.items()}
    readers: dict[str, list[int]] = {}
    batchnorms: dict[str, list[int]] = {}
    for root, removed in plan.items():
        for dep, idxs in graph.get_pruning_group(modules[root], tp.prune_conv_out_channels, removed):
            module, fn = dep.target.module, dep.handler
            idxs = [int(i) for i in idxs]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                batchnorms.setdefault(names[module], []).extend(idxs)
            elif fn in _IN_CHANNEL_FNS and not (isinstance(module, nn.Conv2d) and module.groups > 1):
                readers.setdefault(names[module], []).extend(idxs)
    return readers, batchnorms


@torch.no_grad()
def _removed_inputs(model: nn.Module, readers: dict[str, list[int]], batchnorms: dict[str, list[int]],
                    images: Tensor) -> dict[str, Tensor]:
    # On a copy with the removed channels' γ set to 0, each removed channel is the constant act(β) (after any
    # adds, upsampling, pooling or concatenation on the way): read it at every reader's input.
    ghost = copy.deepcopy(model).eval()
    modules = dict(ghost.named_modules())
    for name, idxs in batchnorms.items():
        modules[name].weight[idxs] = 0.0
    constants: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0][:, readers[name]].float()
            constants[name] = x.mean(dim=[d for d in range(x.dim()) if d != 1])
        return hook

    handles = [modules[name].register_forward_pre_hook(record(name)) for name in readers]
    try:
        ghost(images)
    finally:
        for h in handles:
            h.remove()
    return constants


@torch.no_grad()
def compensate_removed_channels(model: nn.Module, readers: dict[str, list[int]], batchnorms: dict[str, list[int]],
                                images: Tensor, following: dict[str, str]) -> None:
    """Fold the constant that each to-be-removed input channel carries into its reader (bias, or the running
    mean of the reader's BatchNorm, ``following[reader]``), in place; see the module doc."""
    constants = _removed_inputs(model, readers, batchnorms, images)
    modules = dict(model.named_modules())
    for name, idxs in readers.items():
        reader, value = modules[name], constants.get(name)
        if value is None:
            continue  # not reached by the forward pass (e.g. a branch unused in eval mode)
        weight = reader.weight[:, idxs].float()
        delta = (weight.sum(dim=(2, 3)) if weight.dim() == 4 else weight) @ value.to(weight.device)
        if reader.bias is not None:
            reader.bias += delta.to(reader.bias.dtype)
            continue
        bn = following.get(name)
        if bn is None or modules[bn].running_mean is None:
            warnings.warn(f"pruning: {name} has no bias or BatchNorm to absorb its removed inputs' constant; "
                          f"its output shifts", RuntimeWarning, stacklevel=2)
            continue
        modules[bn].running_mean -= delta.to(modules[bn].running_mean.dtype)


def prune_model(model: nn.Module, ratio: float = 0.5, threshold: float | None = None, min_channels: int = 8,
                max_layer_ratio: float = 0.9, round_to: int = 1, compensate: bool = True,
                images: Tensor | None = None, scores: Mapping[str, Tensor] | None = None) -> PruningResult:
    """Physically remove channels from ``model`` in place (the rule: docs/pruning.md); ``images``: the
    (1, 3, H, W) trace input (default :func:`detkit.compression.graph.example_images`); ``scores``: per-BatchNorm
    channel scores to rank by instead of |γ| (see :func:`plan_pruning`). Returns what was removed, with the
    channel spec that rebuilds the slim architecture."""
    graph = dependency_graph(model, images)
    groups = channel_groups(model, graph=graph)
    plan = plan_pruning(model, groups, ratio, threshold, min_channels, max_layer_ratio, round_to, scores)
    modules = dict(model.named_modules())
    result = PruningResult(skipped=[(g.root, g.reason) for g in groups if not g.prunable])
    unnormalised = [g.root for g in groups if g.reason.startswith("no BatchNorm")]
    if unnormalised:
        warnings.warn(f"pruning: {len(unnormalised)} BatchNorm-free channel group(s) left whole (no γ to rank "
                      f"channels by): {', '.join(unnormalised)}", UserWarning, stacklevel=2)
    for g in groups:
        if g.prunable:
            result.prunable += g.channels
            result.removed += len(plan.get(g.root, []))
            result.groups.append((g.root, g.channels, g.channels - len(plan.get(g.root, []))))
    if not plan:
        return result
    if compensate:
        readers, batchnorms = _readers_and_batchnorms(graph, modules, plan)
        compensate_removed_channels(model, readers, batchnorms, _trace_images(model, images),
                                    batchnorms_after(graph, model))
    for root, removed in plan.items():
        graph.get_pruning_group(modules[root], tp.prune_conv_out_channels, removed).prune()
        result.channel_spec.append([root, modules[root].out_channels])
    return result


def _trace_images(model: nn.Module, images: Tensor | None) -> Tensor:
    images = example_images(trace_size(model)) if images is None else images
    param = next(model.parameters())
    return images.to(param.device)
