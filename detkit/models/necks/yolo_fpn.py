"""YOLOv3's top-down neck: the deepest map is processed first, then reduced by a 1×1 conv, upsampled ×2
(nearest) and concatenated onto the next shallower backbone map, down to the shallowest one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct


def conv_set(c_in: int, c_mid: int, pairs: int, act: str) -> nn.Sequential:
    """YOLOv3's 'convolutional set': 1×1 (c_mid) then ``pairs`` × (3×3 to 2·c_mid, 1×1 back to c_mid).

    ``pairs=2`` is the paper's five-conv set; ``pairs=0`` a single 1×1 for compact models.
    """
    layers = [ConvBNAct(c_in, c_mid, 1, act=act)]
    for _ in range(pairs):
        layers += [ConvBNAct(c_mid, 2 * c_mid, 3, act=act), ConvBNAct(2 * c_mid, c_mid, 1, act=act)]
    return nn.Sequential(*layers)


class YOLOv3Neck(nn.Module):
    """Top-down fusion of backbone maps.

    Args:
        in_channels: channels of the backbone maps, shallowest first (e.g. strides 8, 16, 32).
        channels: ``c_mid`` of each level's conv set, shallowest first.
        pairs: (3×3, 1×1) pairs in each conv set, or one count per level, shallowest first.
        lateral: yolov4.cfg's top-down pass: a 1×1 conv takes each backbone map but the deepest to
            ``channels[i]`` and is concatenated *before* the upsampled map; without it (yolov3.cfg) the backbone
            map itself is concatenated after the upsampled one.

    Input: maps shallowest first; output: one map per level, shallowest first, with ``channels[i]`` channels
    and the input's spatial size. ``sets``, ``reduce`` and ``laterals`` (None without ``lateral``) are listed
    deepest level first.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], pairs: int | Sequence[int] = 2,
                 act: str = "leaky", lateral: bool = False):
        super().__init__()
        n = len(in_channels)
        pairs = [pairs] * n if isinstance(pairs, int) else list(pairs)
        if len(channels) != n or len(pairs) != n:
            raise ValueError("in_channels, channels and a per-level pairs list must have one entry per level")
        self.sets = nn.ModuleList()
        self.reduce = nn.ModuleList()
        # Created only when asked for, so that models without them keep their parameters (and checkpoints).
        self.laterals = nn.ModuleList() if lateral else None
        for level in reversed(range(n)):
            up = channels[level + 1] // 2 if level < n - 1 else 0
            c_in = channels[level] if lateral and up else in_channels[level]
            self.sets.append(conv_set(c_in + up, channels[level], pairs[level], act))
            if level > 0:
                self.reduce.append(ConvBNAct(channels[level], channels[level] // 2, 1, act=act))
            if lateral and up:
                self.laterals.append(ConvBNAct(in_channels[level], channels[level], 1, act=act))
        self.out_channels = list(channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        outputs = []
        x = None
        for i, feature in enumerate(reversed(features)):
            if x is not None:
                up = nn.functional.interpolate(self.reduce[i - 1](x), size=feature.shape[-2:], mode="nearest")
                if self.laterals is None:
                    feature = torch.cat([up, feature], dim=1)
                else:
                    feature = torch.cat([self.laterals[i - 1](feature), up], dim=1)
            x = self.sets[i](feature)
            outputs.append(x)
        return outputs[::-1]
