"""Feature Pyramid Network (Lin et al., CVPR 2017): torchvision's ``FeaturePyramidNetwork`` on a list of maps.

Top-down: a 1×1 lateral conv on each backbone map, the coarser result upsampled 2× (nearest) and added, then a
3×3 smoothing conv, all to ``out_channels``. Extra levels on top: FPN's P6 by stride-2 subsampling of P5
(``extra="pool"``, torchvision's ``LastLevelMaxPool``, kernel 1 stride 2), or RetinaNet's P6 = 3×3 stride-2 conv
of C5 (or P5) and P7 = 3×3 stride-2 conv of ReLU(P6) (``extra="p6p7"``, torchvision's ``LastLevelP6P7``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["FPN"]

EXTRAS = ("pool", "p6p7", "none")


class FPN(nn.Module):
    """Backbone maps [C2, C3, C4, C5] → pyramid [P_first, …] of ``out_channels`` each.

    Args:
        in_channels: channels of every backbone map (the backbone's ``out_channels``).
        out_channels: width of every pyramid level (256 in the papers).
        first_level: index of the first backbone map used (0: C2 → P2–P5 for Faster R-CNN; 1: C3 → P3–P5 for
            RetinaNet, which skips P2).
        extra: ``pool`` (P6 subsampled from P5), ``p6p7`` (P6, P7 by strided convs) or ``none``.
        p6_from: for ``p6p7``, ``c5`` (the RetinaNet paper) or ``p5`` (torchvision's ``retinanet_resnet50_fpn``,
            fewer parameters).
        outputs: None (every level), or only the ``outputs`` finest levels (with ``extra="none"``): the coarser
            levels still feed the top-down path, but their 3×3 smoothing, whose result nothing would read, is
            not built (a single-level RoI detector pools the finest alone).

    ``strides``: stride of each output level relative to the input, given the backbone map ``in_strides``
    (default 4, 8, 16, 32: C2–C5).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, first_level: int = 0,
                 extra: str = "pool", p6_from: str = "c5", in_strides: Sequence[int] = (4, 8, 16, 32),
                 outputs: int | None = None) -> None:
        super().__init__()
        if extra not in EXTRAS:
            raise ValueError(f"unknown FPN extra levels {extra!r}; expected one of {', '.join(EXTRAS)}")
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be c5 or p5, got {p6_from!r}")
        if int(out_channels) < 1:
            raise ValueError(f"FPN out_channels (model.fpn_channels) must be ≥ 1, got {out_channels}")
        if not 0 <= first_level < len(in_channels):
            raise ValueError(f"first_level {first_level} outside the {len(in_channels)} backbone maps")
        used = list(in_channels)[first_level:]
        if outputs is not None and not (1 <= outputs <= len(used) and extra == "none"):
            raise ValueError(f"outputs must be in 1..{len(used)} (the levels of the maps used), with extra='none'; "
                             f"got outputs={outputs}, extra={extra!r}")
        extra_block = None
        if extra == "pool":
            extra_block = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(used[-1] if p6_from == "c5" else out_channels, out_channels)
            extra_block.use_P5 = p6_from == "p5"  # explicit: torchvision guesses it from the channel counts
        self.first_level = first_level
        self.fpn = FeaturePyramidNetwork(used, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        strides = list(in_strides)[first_level:]
        extra_levels = {"pool": 1, "p6p7": 2, "none": 0}[extra]
        self.strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(extra_levels)]
        if outputs is not None:
            for i in range(outputs, len(used)):
                self.fpn.layer_blocks[i] = nn.Identity()
            self.strides = self.strides[:outputs]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """Backbone maps (B, in_channels[i], H_i, W_i) → pyramid levels (B, out_channels, H_l, W_l), finest
        first (``num_levels`` of them)."""
        used = list(maps)[self.first_level:]
        if len(used) != len(self.fpn.inner_blocks):
            raise ValueError(f"FPN built for {len(self.fpn.inner_blocks) + self.first_level} backbone maps, got "
                             f"{len(maps)}")
        out = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(used)))
        return list(out.values())[:self.num_levels]
