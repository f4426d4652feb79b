"""Darknet backbones (Redmon & Farhadi, YOLOv3): strided 3×3 downsampling followed by residual units.

``Darknet(depths=(1, 2, 8, 8, 4), width=32)`` is Darknet-53 (52 convolutions + the classifier's FC);
smaller depths/width give the compact backbones that fit a CPU budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkit.models.backbones.conv_options import apply_residual_options
from detkit.models.layers import ConvBNAct, DarknetResidual


class StagedBackbone(nn.Module):
    """A ``stem`` then ``stages`` in sequence; returns the last ``num_outputs`` stage maps, shallowest first."""

    stem: nn.Module
    stages: nn.ModuleList
    num_outputs: int

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[-self.num_outputs :]


class Darknet(StagedBackbone):
    """Residual Darknet returning the feature maps of the last ``num_outputs`` stages.

    Args:
        depths: residual units per stage; stage ``i`` has stride ``stem_stride * 2 ** (i + 1)``.
        width: channels of the stem; stage ``i`` has ``2 * width * 2 ** i`` channels.
        num_outputs: how many of the deepest stages to return (3 → strides 8, 16, 32 for 5 stages).
        act: activation name (see :func:`detkit.models.layers.activation`).
        stem_stride: 1 as in Darknet-53; 2 halves the resolution before the first stage (every stride
            doubles), which keeps full-resolution activations out of a CPU budget.
        se: a squeeze-and-excitation block in every residual unit (default off).
        deform_stages: indices into the stages (0 = the first) whose residual units' 3×3 convs become
            deformable (:mod:`detkit.models.backbones.conv_options`; default none).
        block: ``plain``, or ``igc``: every residual unit's 3×3 conv is an interleaved group convolution with
            ``igc_groups`` = [L, M] (primary, secondary groups).

    Input ``(B, 3, H, W)`` with H, W multiples of ``2 ** len(depths)``; output a list of
    ``(B, out_channels[i], H / strides[i], W / strides[i])`` maps, shallowest first.
    """

    def __init__(
        self, depths: Sequence[int] = (1, 2, 8, 8, 4), width: int = 32, num_outputs: int = 3, act: str = "leaky",
        stem_stride: int = 1, se: bool = False, deform_stages: Sequence[int] | None = None, block: str = "plain",
        igc_groups: Sequence[int] = (4, 4),
    ) -> None:
        super().__init__()
        if not 1 <= num_outputs <= len(depths):
            raise ValueError(f"num_outputs must be in 1..{len(depths)}, got {num_outputs}")
        self.stem = ConvBNAct(3, width, 3, stride=stem_stride, act=act)
        stages = []
        c_in = width
        for i, depth in enumerate(depths):
            c_out = 2 * width * 2**i
            layers = [ConvBNAct(c_in, c_out, 3, stride=2, act=act)]
            layers += [DarknetResidual(c_out, act, se=se) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        apply_residual_options(self.stages, deform_stages, block, igc_groups)
        self.num_outputs = num_outputs
        self.out_channels = [2 * width * 2**i for i in range(len(depths))][-num_outputs:]
        self.strides = [stem_stride * 2 ** (i + 1) for i in range(len(depths))][-num_outputs:]

