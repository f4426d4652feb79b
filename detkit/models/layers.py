"""Building blocks shared by backbones, necks and heads."""

from __future__ import annotations

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


class DarknetResidual(nn.Module):
    """Darknet-53 residual unit: 1×1 conv to half width, 3×3 conv back, identity added. Shape-preserving."""

    def __init__(self, channels: int, act: str = "leaky") -> None:
        super().__init__()
        hidden = channels // 2
        self.reduce = ConvBNAct(channels, hidden, 1, act=act)
        self.expand = ConvBNAct(hidden, channels, 3, act=act)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.expand(self.reduce(x))
