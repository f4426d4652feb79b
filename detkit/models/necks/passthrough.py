"""YOLOv2's passthrough neck: the stride-16 map, reorganised 2×2 into channels, is concatenated onto the
stride-32 map so that the single output level keeps fine-grained features for small objects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct, space_to_depth


class Passthrough(nn.Module):
    """Fuse the two deepest backbone maps into one.

    Args:
        in_channels: channels of the backbone maps, shallowest first; the last two are used (strides s, 2s).
        channels: output width; only the last entry is used (YOLOv2 has one level).
        reorg_channels: the 1×1 reduction of the fine map before the reorg (64 in YOLOv2, giving 256 channels).

    Deep map: two 3×3 convs at its width (YOLOv2's detection convs); fine map: 1×1 to ``reorg_channels``,
    :func:`space_to_depth` (×4 channels, half the size); concatenated, then a 1×1 conv to ``channels[-1]``.
    Input: maps shallowest first, the last two (B, C1, 2H, 2W), (B, C2, H, W); output ``[(B, channels[-1], H, W)]``.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], reorg_channels: int = 64,
                 act: str = "leaky"):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError("Passthrough needs the backbone's two deepest maps (num_outputs >= 2)")
        fine, deep = in_channels[-2], in_channels[-1]
        self.deep = nn.Sequential(ConvBNAct(deep, deep, 3, act=act), ConvBNAct(deep, deep, 3, act=act))
        self.reduce = ConvBNAct(fine, reorg_channels, 1, act=act)
        self.fuse = ConvBNAct(deep + 4 * reorg_channels, channels[-1], 1, act=act)
        self.out_channels = [channels[-1]]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        fine = space_to_depth(self.reduce(features[-2]), 2)
        return [self.fuse(torch.cat([fine, self.deep(features[-1])], dim=1))]
