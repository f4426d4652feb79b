"""Backbone options that swap a backbone's 3×3 convolutions after it is built: deformable convolutions
(:class:`~detkit.models.deformable.DeformableConv2d`, in chosen stages) and interleaved group convolutions
(:class:`~detkit.models.igc.InterleavedGroupConv`). Both are off by default; a backbone with neither is
unchanged, parameters and state-dict keys included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from detkit.errors import ConfigError
from detkit.models.deformable import DeformableConv2d
from detkit.models.igc import InterleavedGroupConv
from detkit.models.layers import DarknetResidual

__all__ = ["BLOCKS", "replace_3x3_convs", "stage_indices", "apply_residual_options"]

BLOCKS = ("plain", "igc")


def replace_3x3_convs(module: nn.Module, make: Callable[[nn.Conv2d], nn.Module]) -> int:
    """Replace every 3×3 ``nn.Conv2d`` inside ``module`` (at any depth) by ``make(conv)``; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Conv2d and child.kernel_size == (3, 3):
            setattr(module, name, make(child))
            count += 1
        else:
            count += replace_3x3_convs(child, make)
    return count


def stage_indices(indices: Sequence[int] | None, num_stages: int, option: str) -> list[int]:
    """``indices`` checked against ``num_stages`` (0-based, the first stage is 0), sorted without repeats."""
    chosen = sorted({int(i) for i in indices or ()})
    if chosen and not 0 <= chosen[0] <= chosen[-1] < num_stages:
        raise ConfigError(f"{option}: stage indices must be in 0..{num_stages - 1} (0 is the first stage), got "
                          f"{list(indices)}")
    return chosen


def apply_residual_options(stages: nn.ModuleList, deform_stages: Sequence[int] | None, block: str,
                           igc_groups: Sequence[int]) -> None:
    """The options of Darknet-style backbones, applied to the 3×3 conv of every
    :class:`~detkit.models.layers.DarknetResidual` in ``stages`` (not the strided downsampling convs):
    ``block='igc'`` makes each an :class:`InterleavedGroupConv` with ``igc_groups`` = (L, M) in every stage;
    ``deform_stages`` makes those of the listed stages deformable (with ``block='plain'`` only)."""
    if block not in BLOCKS:
        raise ConfigError(f"unknown backbone block {block!r}; expected one of {', '.join(BLOCKS)}")
    chosen = stage_indices(deform_stages, len(stages), "deform_stages")
    if block == "igc":
        if chosen:
            raise ConfigError("deform_stages and block=igc both replace the residual units' 3×3 conv; choose one")
        if len(igc_groups) != 2:
            raise ConfigError(f"igc_groups must be [L, M] (primary, secondary groups), got {list(igc_groups)}")
        primary, secondary = (int(g) for g in igc_groups)
        for stage in stages:
            for unit in _residual_units(stage):
                replace_3x3_convs(unit, lambda conv: InterleavedGroupConv.from_conv(conv, primary, secondary))
    for i in chosen:
        for unit in _residual_units(stages[i]):
            replace_3x3_convs(unit, DeformableConv2d.from_conv)


def _residual_units(stage: nn.Module) -> list[DarknetResidual]:
    return [m for m in stage.modules() if isinstance(m, DarknetResidual)]
