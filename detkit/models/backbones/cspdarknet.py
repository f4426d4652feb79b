"""CSPDarknet53 (YOLOv4; Wang et al. 2019's cross-stage partial connections on Darknet-53), with Mish.

Each stage downsamples, then splits into two 1×1 branches: one runs the residual units, the other bypasses
them; the two are concatenated and fused by a 1×1 conv. Half the channels skip the residual units, which
cuts computation and duplicate gradient paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.backbones.conv_options import apply_residual_options
from detkit.models.backbones.darknet import StagedBackbone
from detkit.models.layers import ConvBNAct, DarknetResidual


class CSPStage(nn.Module):
    """Strided 3×3 conv to ``c_out``, then the cross-stage partial block around ``depth`` residual units.

    Each branch has ``c_out / 2`` channels and the residual units keep that width; with ``wide`` (darknet's
    first CSP stage in yolov4.cfg) each branch has ``c_out`` channels and the units bottleneck to ``c_out / 2``.
    Input (B, c_in, H, W) → output (B, c_out, H / 2, W / 2).
    """

    def __init__(self, c_in: int, c_out: int, depth: int, act: str = "mish", wide: bool = False) -> None:
        super().__init__()
        hidden = c_out if wide else c_out // 2
        unit_hidden = hidden // 2 if wide else hidden
        self.down = ConvBNAct(c_in, c_out, 3, stride=2, act=act)
        self.bypass = ConvBNAct(c_out, hidden, 1, act=act)
        self.main = nn.Sequential(
            ConvBNAct(c_out, hidden, 1, act=act),
            *[DarknetResidual(hidden, act, hidden=unit_hidden) for _ in range(depth)],
            ConvBNAct(hidden, hidden, 1, act=act),
        )
        self.fuse = ConvBNAct(2 * hidden, c_out, 1, act=act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return self.fuse(torch.cat([self.main(x), self.bypass(x)], dim=1))


class CSPDarknet(StagedBackbone):
    """CSPDarknet returning the feature maps of the last ``num_outputs`` stages.

    ``CSPDarknet(depths=(1, 2, 8, 8, 4), width=32)`` is YOLOv4's CSPDarknet53. Arguments and outputs as
    :class:`detkit.models.backbones.darknet.Darknet`: stage ``i`` has ``2 * width * 2 ** i`` channels and
    stride ``stem_stride * 2 ** (i + 1)``; input H, W multiples of the deepest stride. ``wide_first_stage``
    makes the first stage darknet's (:class:`CSPStage` ``wide``), as yolov4.cfg has it. ``deform_stages``,
    ``block`` and ``igc_groups`` as Darknet's: they change the 3×3 convs of the residual units (in ``main``).
    """

    def __init__(
        self, depths: Sequence[int] = (1, 2, 8, 8, 4), width: int = 32, num_outputs: int = 3, act: str = "mish",
        stem_stride: int = 1, wide_first_stage: bool = False, deform_stages: Sequence[int] | None = None,
        block: str = "plain", igc_groups: Sequence[int] = (4, 4),
    ) -> None:
        super().__init__()
        if not 1 <= num_outputs <= len(depths):
            raise ValueError(f"num_outputs must be in 1..{len(depths)}, got {num_outputs}")
        self.stem = ConvBNAct(3, width, 3, stride=stem_stride, act=act)
        channels = [2 * width * 2**i for i in range(len(depths))]
        self.stages = nn.ModuleList(
            CSPStage(channels[i - 1] if i else width, channels[i], depth, act, wide=wide_first_stage and i == 0)
            for i, depth in enumerate(depths)
        )
        apply_residual_options(self.stages, deform_stages, block, igc_groups)
        self.num_outputs = num_outputs
        self.out_channels = channels[-num_outputs:]
        self.strides = [stem_stride * 2 ** (i + 1) for i in range(len(depths))][-num_outputs:]
