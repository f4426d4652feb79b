"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Large (Howard et al. 2019) as SSDLite backbones:
torchvision's ``features`` plus depthwise-separable extra layers, six maps for a light SSD on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large

from detkit.convert.pretrained import load_prefixed

__all__ = ["separable_conv", "MobileNetV2SSD", "MobileNetV3SSD", "normal_init"]

_STRIDE8 = 7    # first stride-16 block of torchvision's ``features``: its expansion runs at stride 8 (192 channels)
_STRIDE16 = 13  # last block of torchvision's ``features`` at stride 16 (96 channels at width 1)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


def separable_conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Sequential:
    """3×3 depthwise conv + BN + ReLU6, then a 1×1 pointwise conv (linear, with bias): SSDLite's replacement for a
    3×3 prediction conv, at about 1/9 of its cost for wide outputs."""
    return nn.Sequential(_conv_bn(c_in, c_in, 3, stride, groups=c_in), nn.Conv2d(c_in, c_out, 1, bias=bias))


def _tap_expansion(parts: nn.Sequential, x: Tensor, maps: list[Tensor]) -> Tensor:
    """Run an inverted-residual block without a residual (``parts``: its expansion conv first, then the rest),
    appending the expansion's output to ``maps`` (SSDLite's tap)."""
    x = parts[0](x)
    maps.append(x)
    return parts[1:](x)


def _separable_down(c_in: int, c_out: int) -> nn.Sequential:
    """SSDLite extra layer: 1×1 to c_out/2, 3×3 depthwise stride 2, 1×1 to c_out (each BN + ReLU6); halves the
    map, rounding up."""
    mid = max(1, c_out // 2)
    return nn.Sequential(_conv_bn(c_in, mid, 1), _conv_bn(mid, mid, 3, 2, groups=mid), _conv_bn(mid, c_out, 1))


class MobileNetV2SSD(nn.Module):
    """MobileNetV2 → six maps: the end of the stride-16 blocks, the final 1×1 conv (stride 32), and four
    depthwise-separable extra layers (strides 64 … 512); with ``stride8``, seven: first the output of the expansion
    1×1 conv of the block that halves the stride-8 map (192 channels at width 1; SSDLite taps expansions), for
    objects of a few percent of the input, which a stride-16 grid of IoU-matched boxes cannot cover.

    At 320 px the maps are 20², 10², 5², 3², 2², 1² (40² first with ``stride8``); any input size works (the
    extras round up down to 1²).

    Args:
        width: MobileNetV2's width multiplier (``torchvision.models.mobilenet_v2(width_mult=...)``), also
            applied to ``extra_channels``.
        extra_channels: output channels of the four extra layers at width 1.
        pretrained: a local state dict file of ``torchvision.models.mobilenet_v2`` with the same ``width``, or a
            torchvision weights name (``MobileNet_V2_Weights.IMAGENET1K_V1``)
            (its ``features.*`` entries are read); the extra layers stay randomly initialised.
        stride8: also give the stride-8 map (an expansion's output), first.
        init_std: every conv of the backbone (unless ``pretrained``) and of the extra layers drawn from
            N(0, init_std²), biases 0, as torchvision initialises its SSDLite; None keeps torchvision's MobileNetV2
            initialisation (Kaiming, fan-out).
    """

    def __init__(self, width: float = 1.0, extra_channels: tuple[int, ...] = (512, 256, 256, 128),
                 pretrained: str | None = None, stride8: bool = False, init_std: float | None = None) -> None:
        super().__init__()
        self.features = mobilenet_v2(weights=None, width_mult=width).features
        if pretrained:
            load_prefixed(self.features, pretrained)
        self.stride8 = stride8
        c8 = self.features[_STRIDE8].conv[0].out_channels
        c16 = self.features[_STRIDE16].out_channels
        c32 = self.features[-1].out_channels
        extras = [max(8, round(c * width)) for c in extra_channels]
        self.extras = nn.ModuleList(_separable_down(c_in, c_out) for c_in, c_out in zip([c32, *extras], extras))
        if init_std is not None:
            normal_init(self.extras, init_std)
            if not pretrained:
                normal_init(self.features, init_std)
        self.out_channels = [*([c8] if stride8 else []), c16, c32, *extras]

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for i, layer in enumerate(self.features):
            if i == _STRIDE8 and self.stride8:  # a stride-2 block: no residual
                x = _tap_expansion(layer.conv, x, maps)
            else:
                x = layer(x)
            if i == _STRIDE16:
                maps.append(x)
        maps.append(x)
        # The extra layers run in float32 even under autocast: with bf16 on channels_last, their depthwise
        # weights' gradients came out non-finite for some initialisations (2² and 1² maps, torch 2.14 on CPU);
        # the maps are tiny, so float32 costs next to nothing.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for extra in self.extras:
                x = extra(x)
                maps.append(x)
        return maps


def normal_init(module: nn.Module, std: float) -> None:
    """Every conv of ``module`` drawn from N(0, std²), its bias 0 (torchvision's SSDLite initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class MobileNetV3SSD(nn.Module):
    """MobileNetV3-Large → six maps, as torchvision's ``ssdlite320_mobilenet_v3_large`` builds its extractor:
    the output of the expansion 1×1 conv of the last stride-2 block (C4, stride 16: 672 channels at width 1), the
    end of ``features`` (stride 32: 480 channels with ``reduced_tail``, 960 without), then four
    depthwise-separable extra layers (strides 64 … 512). At 320 px the maps are 20², 10², 5², 3², 2², 1².

    Args:
        width: MobileNetV3's width multiplier, also applied to ``extra_channels`` (at least 16, torchvision's
            ``min_depth``).
        extra_channels: output channels of the four extra layers at width 1.
        reduced_tail: halve the channels of the last stage, as torchvision does for a randomly initialised
            backbone (and for its COCO weights).
        init_std: every conv of the backbone (unless ``pretrained``) and of the extra layers drawn from
            N(0, init_std²), biases 0 (torchvision's 0.03); None keeps torchvision's classifier initialisation.
        pretrained: a local state dict file of ``torchvision.models.mobilenet_v3_large`` with the same ``width``
            and ``reduced_tail``, or a torchvision weights name; its ``features.*`` entries are read.
        stride8: also give a stride-8 map, first: the expansion conv's output of the block that halves the stride-8
            map (240 channels at width 1), tapped as C4 is, for objects of a few percent of the input.
        stride4: also give a stride-4 map, before all others: the expansion conv's output of the block that halves
            the stride-4 map (72 channels at width 1), for objects of a few pixels (default boxes of ~2× the
            stride reach them at IoU 0.5 only on a map this fine).
    """

    def __init__(self, width: float = 1.0, extra_channels: tuple[int, ...] = (512, 256, 256, 128),
                 reduced_tail: bool = True, init_std: float | None = 0.03, pretrained: str | None = None,
                 stride8: bool = False, stride4: bool = False) -> None:
        super().__init__()
        self.features = mobilenet_v3_large(weights=None, width_mult=width, reduced_tail=reduced_tail).features
        # torchvision's C4: the last block that halves the map (its expansion conv runs at stride 16); C3 the one
        # before it (its expansion runs at stride 8).
        halving = [i for i, block in enumerate(self.features) if getattr(block, "_is_cn", False)]
        self.c4 = halving[-1]
        self.c3 = halving[-2] if stride8 else None
        self.c2 = halving[-3] if stride4 else None  # its expansion runs at stride 4
        taps = [i for i in (self.c2, self.c3, self.c4) if i is not None]
        if any(self.features[i].use_res_connect for i in taps):
            raise ValueError("a tapped block of MobileNetV3 has a residual connection: its expansion cannot be tapped")
        extras = [max(16, int(c * width)) for c in extra_channels]
        c32 = self.features[-1].out_channels
        self.extras = nn.ModuleList(_separable_down(c_in, c_out) for c_in, c_out in zip([c32, *extras], extras))
        self.out_channels = [*(self.features[i].block[0].out_channels for i in taps), c32, *extras]
        if init_std is not None:
            normal_init(self.extras, init_std)
            if not pretrained:
                normal_init(self.features, init_std)
        if pretrained:
            load_prefixed(self.features, pretrained)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images → six maps (B, out_channels[i], H / 16 / 2^i, W / 16 / 2^i), rounded up
        (one more first with ``stride8``, at H / 8, and one more before it with ``stride4``, at H / 4)."""
        maps = []
        for i, layer in enumerate(self.features):
            if i in (self.c2, self.c3, self.c4):  # no residual here: the block is its expansion followed by the rest
                x = _tap_expansion(layer.block, x, maps)
            else:
                x = layer(x)
        maps.append(x)
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        return maps
