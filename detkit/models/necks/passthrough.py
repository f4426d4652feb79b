"""YOLOv2's passthrough neck: the stride-16 map, reorganised 2×2 into channels, is concatenated onto the
stride-32 map so that the single output level keeps fine-grained features for small objects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct, darknet_reorg, space_to_depth

REORGS = {"pixel_unshuffle": space_to_depth, "darknet": darknet_reorg}


class Passthrough(nn.Module):
    """Fuse the two deepest backbone maps into one.

    Args:
        in_channels: channels of the backbone maps, shallowest first; the last two are used (strides s, 2s).
        channels: output width with ``fuse``; only the last entry is used (YOLOv2 has one level).
        reorg_channels: the 1×1 reduction of the fine map before the reorg (64 in YOLOv2, giving 256 channels).
        reorg: how 2×2 patches become channels: ``pixel_unshuffle`` (:func:`space_to_depth`) or ``darknet``
            (:func:`darknet_reorg`, the channel order yolov2.cfg's published weights were trained with).
        fuse: a 1×1 conv from the concatenation to ``channels[-1]``; without it (yolov2.cfg) the output is the
            concatenation itself, ``4·reorg_channels + C2`` channels.

    Deep map: two 3×3 convs at its width (YOLOv2's detection convs); fine map: 1×1 to ``reorg_channels``, the
    reorg (×4 channels, half the size); concatenated fine first (yolov2.cfg's ``[route] layers=-1,-4``), then
    with ``fuse`` the 1×1 conv. Input: maps shallowest first, the last two (B, C1, 2H, 2W), (B, C2, H, W);
    output ``[(B, out_channels[0], H, W)]``.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], reorg_channels: int = 64,
                 act: str = "leaky", reorg: str = "pixel_unshuffle", fuse: bool = True):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError("Passthrough needs the backbone's two deepest maps (num_outputs >= 2)")
        if reorg not in REORGS:
            raise ValueError(f"unknown reorg {reorg!r}; expected one of {', '.join(REORGS)}")
        fine, deep = in_channels[-2], in_channels[-1]
        self.reorg = reorg
        self.deep = nn.Sequential(ConvBNAct(deep, deep, 3, act=act), ConvBNAct(deep, deep, 3, act=act))
        self.reduce = ConvBNAct(fine, reorg_channels, 1, act=act)
        # None rather than an unused module: darknet's layout and parameter count see every conv of the model.
        self.fuse = ConvBNAct(deep + 4 * reorg_channels, channels[-1], 1, act=act) if fuse else None
        self.out_channels = [channels[-1] if fuse else deep + 4 * reorg_channels]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        fine = REORGS[self.reorg](self.reduce(features[-2]), 2)
        joined = torch.cat([fine, self.deep(features[-1])], dim=1)
        return [joined if self.fuse is None else self.fuse(joined)]
