"""Building blocks shared by backbones, necks and heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def activation(name: str) -> nn.Module:
    """Activation module by name: ``leaky`` (slope 0.1, as in Darknet), ``relu``, ``silu``, ``mish``."""
    if name == "leaky":
        return nn.LeakyReLU(0.1, inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "mish":
        return nn.Mish(inplace=True)
    raise ValueError(f"unknown activation {name!r}; expected one of leaky, relu, silu, mish")


def set_bn_eps(model: nn.Module, eps: float) -> None:
    """Set every BatchNorm's (and FrozenBatchNorm2d's) ε in ``model`` (converted weights keep the ε they were
    trained with)."""
    from torchvision.ops import FrozenBatchNorm2d

    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            module.eps = float(eps)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → activation; 'same' padding for odd kernels.

    The conv/BN pair is what Network Slimming prunes: BN's γ scales each output channel.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, act: str = "leaky") -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03),
            activation(act),
        )


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al., CVPR 2018): x · σ(FC(ReLU(FC(global average of x)))), one weight per
    channel from a bottleneck of ``channels / reduction`` (at least 8). Shape-preserving, (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


class DarknetResidual(nn.Module):
    """Darknet-53 residual unit: 1×1 conv to ``hidden`` (default half) width, 3×3 conv back, identity added;
    with ``se``, a :class:`SqueezeExcitation` rescales the branch before the addition (SE-ResNet's place).
    Shape-preserving."""

    def __init__(self, channels: int, act: str = "leaky", hidden: int | None = None, se: bool = False) -> None:
        super().__init__()
        hidden = channels // 2 if hidden is None else hidden
        self.reduce = ConvBNAct(channels, hidden, 1, act=act)
        self.expand = ConvBNAct(hidden, channels, 3, act=act)
        # Created only when asked for, so that models without it keep their parameters (and checkpoints).
        self.se = SqueezeExcitation(channels) if se else None

    def forward(self, x: Tensor) -> Tensor:
        branch = self.expand(self.reduce(x))
        if self.se is not None:
            branch = self.se(branch)
        return x + branch


def space_to_depth(x: Tensor, block: int = 2) -> Tensor:
    """YOLOv2's passthrough 'reorg': (B, C, H, W) → (B, C·block², H / block, W / block).

    Each block×block patch becomes block² channels, so a finer map can be concatenated onto a coarser one
    without losing its spatial detail to pooling. H and W must be multiples of ``block``.
    """
    return nn.functional.pixel_unshuffle(x, block)


class SpatialAttention(nn.Module):
    """YOLOv4's point-wise SAM: x · σ(BN(conv1×1(x))), an attention value per position *and* channel
    (the original SAM pools over channels first; YOLOv4 drops the pooling). Shape-preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.03)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.bn(self.conv(x)).sigmoid()


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero contiguous ``block``×``block`` regions so that a
    convolution cannot rely on the neighbours of a dropped unit; identity in eval mode. Shape-preserving.

    ``prob`` is the fraction of units dropped; seeds are drawn at rate γ = prob / block² (ignoring the border
    correction of the paper) and the kept units are rescaled by numel / kept.
    """

    def __init__(self, prob: float = 0.1, block: int = 3) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0 or block % 2 == 0:
            raise ValueError(f"DropBlock needs 0 <= prob < 1 and an odd block, got {prob}, {block}")
        self.prob, self.block = prob, block

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.prob == 0.0:
            return x
        gamma = self.prob / self.block**2
        seeds = (torch.rand_like(x) < gamma).to(x.dtype)
        mask = 1.0 - nn.functional.max_pool2d(seeds, self.block, stride=1, padding=self.block // 2)
        return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))
