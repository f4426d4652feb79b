"""PANet path aggregation as YOLOv4 uses it: YOLOv3's top-down pass, then a bottom-up pass that carries the
shallow, well-localised maps back up to the deep levels (Liu et al. 2018), fusing by concatenation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.layers import ConvBNAct
from detkit.models.necks.yolo_fpn import YOLOv3Neck, conv_set


class PANet(nn.Module):
    """Top-down (:class:`YOLOv3Neck`) then bottom-up aggregation.

    Args:
        in_channels: channels of the backbone maps, shallowest first (e.g. strides 8, 16, 32), each level
            twice the resolution of the next.
        channels: ``c_mid`` of each level's conv sets, shallowest first.
        pairs: (3×3, 1×1) pairs in each conv set (2 in YOLOv4).
        top_down_pairs: the top-down pass's pairs, one count or one per level (shallowest first); None: ``pairs``.
            yolov4.cfg: [2, 2, 1], the deepest set after its SPP block having three convs.
        lateral: the top-down pass's 1×1 lateral convs (:class:`YOLOv3Neck` ``lateral``), as in yolov4.cfg.

    Bottom-up step for level i > 0: a 3×3 stride-2 conv takes the aggregated level i − 1 to ``channels[i]``,
    it is concatenated with the top-down level i and a conv set reduces it to ``channels[i]``.
    Input: maps shallowest first; output: one map per level, shallowest first, ``channels[i]`` channels and the
    input's spatial size.
    """

    def __init__(self, in_channels: Sequence[int], channels: Sequence[int], pairs: int = 2, act: str = "leaky",
                 top_down_pairs: int | Sequence[int] | None = None, lateral: bool = False):
        super().__init__()
        top_down_pairs = pairs if top_down_pairs is None else top_down_pairs
        self.top_down = YOLOv3Neck(in_channels, channels, top_down_pairs, act, lateral)
        self.down = nn.ModuleList(
            ConvBNAct(channels[i - 1], channels[i], 3, stride=2, act=act) for i in range(1, len(channels))
        )
        self.sets = nn.ModuleList(conv_set(2 * channels[i], channels[i], pairs, act) for i in range(1, len(channels)))
        self.out_channels = list(channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        top_down = self.top_down(features)
        outputs = [top_down[0]]
        for down, fuse, lateral in zip(self.down, self.sets, top_down[1:]):
            x = down(outputs[-1])
            outputs.append(fuse(torch.cat([x, lateral], dim=1)))
        return outputs
