"""VGG16 as modified for SSD (Liu et al. 2016): the backbone of SSD300.

conv1_1 … conv5_3 of VGG16 (Simonyan & Zisserman 2015), pool3 rounding up so that 300 px gives a 38² conv4_3
map, pool5 turned into a 3×3 stride-1 pool, fc6 into a 3×3 convolution of dilation 6 and fc7 into a 1×1
convolution (1024 channels each; no dropout, no fc8). conv4_3's features go through an L2 normalisation with
a learned per-channel scale, because their norm is much larger than that of the deeper maps. Extra layers
conv8 … conv11 bring the maps down to 10², 5², 3², 1².

:class:`VGG16Conv5` is the plain conv1_1 … conv5_3 trunk (stride 16) that Fast R-CNN and G-CNN pool from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers

from detkit.convert.pretrained import load_prefixed

__all__ = ["L2Norm", "VGG16SSD", "VGG16Conv5"]

def _vgg_layout(features: nn.Sequential) -> tuple[int, int, int]:
    """(pool3, conv4_3's ReLU, pool5): their indices in torchvision's ``features`` of vgg16 (16, 22, 30) or
    vgg16_bn (23, 32, 43), found by position: the 3rd and 5th max pools, the ReLU before the 4th."""
    pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
    return pools[2], pools[3] - 1, pools[4]


class L2Norm(nn.Module):
    """x / ‖x‖₂ over channels, times a learned per-channel scale (ParseNet, Liu et al. 2015). (B, C, H, W) →
    (B, C, H, W)."""

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return x / norm * self.weight.view(1, -1, 1, 1)


def _conv_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
               batch_norm: bool = False) -> list[nn.Module]:
    """conv → ReLU, or conv (no bias) → BatchNorm → ReLU (vgg16_bn's order)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]


def _extra(c_in: int, c_mid: int, c_out: int, stride: int, padding: int, batch_norm: bool = False) -> nn.Sequential:
    """1×1 reduction then a 3×3 convolution, each followed by ReLU (BatchNorm, ReLU with ``batch_norm``): conv8 …
    conv11 of SSD300."""
    return nn.Sequential(*_conv_relu(c_in, c_mid, 1, batch_norm=batch_norm),
                         *_conv_relu(c_mid, c_out, 3, stride, padding, batch_norm=batch_norm))


class VGG16SSD(nn.Module):
    """SSD300's VGG16 backbone → six maps: conv4_3 (L2-normalised), fc7, conv8_2, conv9_2, conv10_2, conv11_2.

    At 300 px the maps are 38², 19², 10², 5², 3², 1² with 512, 1024, 512, 256, 256, 256 channels (times
    ``width``). conv10_2 and conv11_2 are unpadded 3×3 convolutions, so the input must be at least 268 px.

    Args:
        width: channel multiplier of every layer (1.0 is the paper's network; small values for CPU budgets).
        batch_norm: every convolution followed by BatchNorm (torchvision's vgg16_bn layout for conv1_1 …
            conv5_3, the same for fc6, fc7 and the extras), for training from random init (as DSOD, Shen et al.
            2017) at AdamW's usual learning rate, at which the plain network diverges (configs/model/ssd300.yaml).
        pretrained: a local state dict file of ``torchvision.models.vgg16`` (``vgg16_bn`` with ``batch_norm``) or a
            weights name (only ``features.*`` entries are read, into conv1_1 … conv5_3); needs ``width`` 1.
            fc6/fc7 and the extra layers stay randomly initialised (the paper subsamples fc6/fc7 from the
            classifier; not done here).
            ``VGG16_Weights.IMAGENET1K_FEATURES`` (the features of the original SSD's VGG) expects 0–255 input:
            give the detector its normalisation too (image_mean [0.48235, 0.45882, 0.40784], image_std
            [1/255]·3), as the torchvision-converted ssd300 checkpoint does.
    """

    def __init__(self, width: float = 1.0, pretrained: str | None = None, batch_norm: bool = False) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(1, round(c * width))

        cfg = [v if v == "M" else ch(v) for v in cfgs["D"]]
        # torchvision's builder gives the same layer indices as vgg16().features (vgg16_bn's with batch_norm),
        # so its checkpoints load as they are; building vgg16() itself would also allocate the 120M-parameter
        # classifier dropped here.
        features = make_layers(cfg, batch_norm=batch_norm)
        pool3, self._conv4_3, pool5 = _vgg_layout(features)
        features = features[:pool5]
        features[pool3].ceil_mode = True  # 75 → 38, not 37, at 300 px
        self.features = features
        c4, c7 = ch(512), ch(1024)
        self.l2norm = L2Norm(c4)
        self.fc = nn.Sequential(
            nn.MaxPool2d(3, 1, 1),
            *_conv_relu(c4, c7, 3, padding=6, dilation=6, batch_norm=batch_norm),
            *_conv_relu(c7, c7, 1, batch_norm=batch_norm),
        )
        self.extras = nn.ModuleList([
            _extra(c7, ch(256), ch(512), 2, 1, batch_norm),
            _extra(ch(512), ch(128), ch(256), 2, 1, batch_norm),
            _extra(ch(256), ch(128), ch(256), 1, 0, batch_norm),
            _extra(ch(256), ch(128), ch(256), 1, 0, batch_norm),
        ])
        self.out_channels = [c4, c7, ch(512), ch(256), ch(256), ch(256)]
        if pretrained:
            self.load_vgg16(pretrained)

    def load_vgg16(self, path: str) -> None:
        """Copy conv1_1 … conv5_3 from a torchvision VGG16 state dict (VGG16-BN's with ``batch_norm``): a local
        file or a weights name (``VGG16_Weights.IMAGENET1K_V1``, ``VGG16_BN_Weights.IMAGENET1K_V1``; see
        :mod:`detkit.convert.pretrained`)."""
        load_prefixed(self.features, path)

    def forward(self, x: Tensor) -> list[Tensor]:
        if min(x.shape[-2:]) < 268:
            raise ValueError(f"VGG16SSD needs inputs of at least 268 px, got {tuple(x.shape[-2:])}")
        maps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self._conv4_3:
                maps.append(self.l2norm(x))
        x = self.fc(x)
        maps.append(x)
        for extra in self.extras:
            x = extra(x)
            maps.append(x)
        return maps


class VGG16Conv5(nn.Module):
    """VGG16's conv1_1 … conv5_3 (ReLU included, pool5 dropped): one map of stride 16, the feature map of Fast
    R-CNN and G-CNN. (B, 3, H, W) → [(B, 512·width, ⌊H/16⌋, ⌊W/16⌋)].

    Args:
        width: channel multiplier (1.0 is VGG16).
        pretrained: a local torchvision ``vgg16`` state dict file or weights name (``features.*``); needs width 1.
    """

    def __init__(self, width: float = 1.0, pretrained: str | None = None) -> None:
        super().__init__()
        cfg = [v if v == "M" else max(1, round(v * width)) for v in cfgs["D"]]
        features = make_layers(cfg)  # torchvision's layer indices: its checkpoints load as they are
        self.features = features[:_vgg_layout(features)[2]]
        self.out_channels = [cfg[-2]]
        self.strides = [16]
        if pretrained:
            self.load_vgg16(pretrained)

    load_vgg16 = VGG16SSD.load_vgg16  # the same ``features`` layout

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.features(x)]
