"""Darknet's tiny backbones: the conv/max-pool stack of yolov2-tiny.cfg and yolov3-tiny.cfg, and the CSP-tiny
stack of yolov4-tiny.cfg, with darknet's max-pool padding (:class:`~detkit.models.layers.DarknetMaxPool`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detkit.models.backbones.darknet import StagedBackbone
from detkit.models.layers import ConvBNAct, DarknetMaxPool


class DarknetTiny(StagedBackbone):
    """yolov2-tiny's and yolov3-tiny's backbone: 3×3 convs of ``width · 2^i`` channels (i = 0..5), a 2×2
    max-pool of stride 2 after each of the first five and of stride 1 after the sixth, then a 3×3 conv of
    ``64 · width`` channels (width 16: 16, 32, …, 512, 1024 — 7 convs). Stage maps at strides 2, 4, 8, 16 and
    32 come after each pool's conv (the stride-32 one after the last conv).

    Args:
        width: channels of the first conv; the width multiplier.
        num_outputs: how many of the deepest maps to return: 1 → the stride-32 map (yolov2-tiny), 2 → also the
            stride-16 one, taken before its pool (yolov3-tiny's route to layer 8).
        act: activation name (see :func:`detkit.models.layers.activation`).

    Input ``(B, 3, H, W)``, H and W multiples of 32; output a list of ``(B, out_channels[i], H / strides[i],
    W / strides[i])`` maps, shallowest first.
    """

    def __init__(self, width: int = 16, num_outputs: int = 2, act: str = "leaky") -> None:
        super().__init__()
        if not 1 <= num_outputs <= 5:
            raise ValueError(f"num_outputs must be in 1..5, got {num_outputs}")
        channels = [width * 2**i for i in range(6)]
        self.stem = ConvBNAct(3, width, 3, act=act)
        stages = [nn.Sequential(DarknetMaxPool(2, 2), ConvBNAct(channels[i - 1], channels[i], 3, act=act))
                  for i in range(1, 5)]
        stages.append(nn.Sequential(DarknetMaxPool(2, 2), ConvBNAct(channels[4], channels[5], 3, act=act),
                                    DarknetMaxPool(2, 1), ConvBNAct(channels[5], 2 * channels[5], 3, act=act)))
        self.stages = nn.ModuleList(stages)
        self.num_outputs = num_outputs
        self.out_channels = [*channels[1:5], 2 * channels[5]][-num_outputs:]
        self.strides = [2, 4, 8, 16, 32][-num_outputs:]


class CSPTinyBlock(nn.Module):
    """yolov4-tiny's cross-stage partial block at width ``c``: a 3×3 conv ``a`` (c_in → c; c_in = c in the
    cfg); the second half of its channels (``[route] groups=2 group_id=1``) through two 3×3 convs ``b``, ``c``
    (c/2 each); [c, b] concatenated and fused by a 1×1 conv ``fuse`` (→ c); then [a, fuse].

    Input (B, c_in, H, W) → (``(B, 2c, H, W)`` the block's output, ``(B, c, H, W)`` the fused partial map that
    yolov4-tiny routes to its stride-16 head).
    """

    def __init__(self, c_in: int, c: int, act: str = "leaky") -> None:
        super().__init__()
        if c % 2:
            raise ValueError(f"a CSP-tiny block splits its channels in two halves; got an odd width {c}")
        self.a = ConvBNAct(c_in, c, 3, act=act)
        self.b = ConvBNAct(c // 2, c // 2, 3, act=act)
        self.c = ConvBNAct(c // 2, c // 2, 3, act=act)
        self.fuse = ConvBNAct(c, c, 1, act=act)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a = self.a(x)
        b = self.b(a[:, a.shape[1] // 2:])
        fused = self.fuse(torch.cat([self.c(b), b], dim=1))
        return torch.cat([a, fused], dim=1), fused


class CSPDarknetTiny(nn.Module):
    """yolov4-tiny's backbone: two strided 3×3 convs (``width``, ``2 · width``; stride 4), three
    :class:`CSPTinyBlock` of widths 2, 4 and 8 × ``width`` with a 2×2 max-pool after each, then a 3×3 conv of
    ``16 · width`` channels (width 32: 21 convs before the neck).

    Args:
        width: channels of the first conv; the width multiplier.
        num_outputs: how many of the deepest maps to return, from each block's fused partial map (strides 4,
            8, 16) and the last conv (stride 32): 2 → strides 16 and 32, yolov4-tiny's two routes.
        act: activation name (see :func:`detkit.models.layers.activation`).

    Input ``(B, 3, H, W)``, H and W multiples of 32; output a list of ``(B, out_channels[i], H / strides[i],
    W / strides[i])`` maps, shallowest first.
    """

    def __init__(self, width: int = 32, num_outputs: int = 2, act: str = "leaky") -> None:
        super().__init__()
        if not 1 <= num_outputs <= 4:
            raise ValueError(f"num_outputs must be in 1..4, got {num_outputs}")
        self.stem = nn.Sequential(ConvBNAct(3, width, 3, stride=2, act=act),
                                  ConvBNAct(width, 2 * width, 3, stride=2, act=act))
        widths = [2 * width, 4 * width, 8 * width]
        self.blocks = nn.ModuleList(CSPTinyBlock(c, c, act) for c in widths)
        self.pool = DarknetMaxPool(2, 2)
        self.last = ConvBNAct(2 * widths[-1], 2 * widths[-1], 3, act=act)
        self.num_outputs = num_outputs
        self.out_channels = [*widths, 2 * widths[-1]][-num_outputs:]
        self.strides = [4, 8, 16, 32][-num_outputs:]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for block in self.blocks:
            x, fused = block(x)
            features.append(fused)
            x = self.pool(x)
        features.append(self.last(x))
        return features[-self.num_outputs:]
