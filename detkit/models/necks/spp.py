"""Spatial pyramid pooling as YOLOv3-SPP and YOLOv4 use it: stride-1 max-pools of several sizes over the
deepest map, concatenated with it, widen the receptive field without changing the resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct


class SPP(nn.Module):
    """Concatenate ``x``'s k×k max-pools (stride 1, 'same' padding), k in ``kernels``, and ``x``, in darknet's
    order (yolov3-spp.cfg / yolov4.cfg route the largest pool first and ``x`` last), so that darknet weights
    of the conv that follows line up.

    Input (B, C, H, W) → output (B, C·(1 + len(kernels)), H, W): 4·C for the usual (5, 9, 13).
    """

    def __init__(self, kernels: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"SPP kernels must be odd to keep the size, got {list(kernels)}")
        self.pools = nn.ModuleList(nn.MaxPool2d(k, stride=1, padding=k // 2) for k in kernels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([pool(x) for pool in reversed(self.pools)] + [x], dim=1)


class SPPBlock(nn.Module):
    """1×1 conv to C/2, ``pairs`` × (3×3 to C, 1×1 back to C/2), :class:`SPP`, giving (B, 2·C, H, W) for a
    (B, C, H, W) input with three kernels: the block YOLOv3-SPP and YOLOv4 put on the deepest backbone map
    before the neck (the halving keeps the neck's first 1×1 conv at the width it has without SPP). Darknet's
    cfgs have ``pairs=1`` (three convs before the pools), and one pair fewer in the conv set after them."""

    def __init__(self, channels: int, kernels: Sequence[int] = (5, 9, 13), act: str = "leaky",
                 pairs: int = 0) -> None:
        super().__init__()
        self.reduce = ConvBNAct(channels, channels // 2, 1, act=act)
        # Created only when asked for, so that models without them keep their parameters (and checkpoints).
        self.convs = nn.Sequential(*(layer for _ in range(pairs) for layer in (
            ConvBNAct(channels // 2, channels, 3, act=act), ConvBNAct(channels, channels // 2, 1, act=act))))
        self.spp = SPP(kernels)
        self.out_channels = channels // 2 * (1 + len(kernels))

    def forward(self, x: Tensor) -> Tensor:
        return self.spp(self.convs(self.reduce(x)))
