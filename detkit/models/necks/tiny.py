"""The necks of darknet's tiny models: yolov3-tiny's and yolov4-tiny's (one 1×1 conv on the deepest map, whose
reduction is upsampled onto the stride-16 map) and yolov2-tiny's (none: the deepest map as it is)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct


class TinyNeck(nn.Module):
    """yolov3-tiny's / yolov4-tiny's two levels.

    Args:
        in_channels: channels of the backbone maps, shallowest first; the last two are used (strides s, 2s).
        channels: width of the deep level's 1×1 conv; only the last entry is used (256 in both cfgs).

    Deep level: 1×1 conv to ``channels[-1]``. Shallow level: that map reduced by a 1×1 conv to half its
    width, upsampled ×2 (nearest) and concatenated before the fine map, with no conv after (the head's 3×3
    takes the concatenation). Input: maps shallowest first, the last two (B, C1, 2H, 2W), (B, C2, H, W); output
    ``[(B, channels[-1] / 2 + C1, 2H, 2W), (B, channels[-1], H, W)]``.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], act: str = "leaky") -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError("TinyNeck needs the backbone's two deepest maps (num_outputs >= 2)")
        width = channels[-1]
        self.deep = ConvBNAct(in_channels[-1], width, 1, act=act)
        self.reduce = ConvBNAct(width, width // 2, 1, act=act)
        self.out_channels = [width // 2 + in_channels[-2], width]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        deep = self.deep(features[-1])
        fine = features[-2]
        up = nn.functional.interpolate(self.reduce(deep), size=fine.shape[-2:], mode="nearest")
        return [torch.cat([up, fine], dim=1), deep]


class DeepestMap(nn.Module):
    """yolov2-tiny's neck, which is none: the backbone's deepest map is the single level (``channels`` and
    ``act`` are accepted for the detector's neck interface and unused). Output ``[(B, in_channels[-1], H, W)]``."""

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int] = (), act: str = "leaky") -> None:
        super().__init__()
        self.out_channels = [in_channels[-1]]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [features[-1]]
