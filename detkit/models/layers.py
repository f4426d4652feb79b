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


def darknet_reorg(x: Tensor, stride: int = 2) -> Tensor:
    """Darknet's ``[reorg]`` layer as yolov2.cfg runs it: (B, C, H, W) → (B, C·stride², H / stride, W / stride).

    Not :func:`space_to_depth`: darknet's loop reads its input buffer as if it were (C / stride², H·stride,
    W·stride) and writes, for each offset (dy, dx) of a stride×stride patch of that view, a block of C / stride²
    channels, in (dy, dx, channel, row, column) order; that buffer is then read as the output's shape. Published
    YOLOv2 weights were trained through this ordering. C must be a multiple of stride², H and W of ``stride``.
    """
    b, c, h, w = x.shape
    if c % (stride * stride) or h % stride or w % stride:
        raise ValueError(f"darknet's reorg needs channels divisible by {stride * stride} and a size divisible by "
                         f"{stride}, got {(c, h, w)}")
    view = x.reshape(b, c // stride**2, h, stride, w, stride)
    return view.permute(0, 3, 5, 1, 2, 4).reshape(b, c * stride**2, h // stride, w // stride)


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


class LocallyConnected2d(nn.Module):
    """A convolution whose kernels are not shared: every output position has its own (darknet's ``[local]``
    layer, in YOLOv1's head). It is built for one input size.

    Args:
        in_channels, out_channels, kernel (square), stride, padding: zeros added on each side, in pixels.
        input_size: (H, W) of the input.

    Parameters: ``weight`` (L, out_channels, in_channels, kernel, kernel), the kernels of the L = out_h·out_w
    output positions in row-major order; ``bias`` (out_channels, out_h, out_w), one per output value. Both are
    darknet's file order. (N, in_channels, H, W) → (N, out_channels, out_h, out_w), out_h = (H + 2·padding −
    kernel) / stride + 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, input_size: tuple[int, int],
                 stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        h, w = input_size
        self.out_size = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        if min(self.out_size) < 1:
            raise ValueError(f"a {kernel}×{kernel} locally connected layer (padding {padding}) has no output "
                             f"position on a {h}×{w} input")
        self.input_size, self.kernel, self.stride, self.padding = (h, w), kernel, stride, padding
        positions = self.out_size[0] * self.out_size[1]
        fan_in = in_channels * kernel * kernel
        # darknet's initialisation: uniform in ±√(2 / fan-in), biases 0
        bound = (2.0 / fan_in) ** 0.5
        self.weight = nn.Parameter(torch.empty(positions, out_channels, in_channels, kernel, kernel)
                                   .uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels, *self.out_size))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"this locally connected layer is built for {self.input_size[0]}×{self.input_size[1]} "
                             f"inputs, got {tuple(x.shape[-2:])}")
        # (N, in·k·k, L): each column one position's patch, in (channel, row, column) order like the kernels
        patches = nn.functional.unfold(x, self.kernel, padding=self.padding, stride=self.stride)
        out = torch.einsum("ncl,loc->nol", patches, self.weight.flatten(2))
        return out.view(len(x), -1, *self.out_size) + self.bias

    def extra_repr(self) -> str:
        positions, out_c, in_c, k, _ = self.weight.shape
        return (f"{in_c}, {out_c}, kernel={k}, stride={self.stride}, padding={self.padding}, "
                f"input_size={self.input_size}, positions={positions}")
class DarknetMaxPool(nn.Module):
    """Darknet's ``[maxpool]``: a ``size``×``size`` max over windows ``stride`` apart, the input padded by
    ``size − 1`` in all with −∞ (``(size − 1) // 2`` before, the rest after), so (B, C, H, W) →
    (B, C, ⌊(H − 1) / stride⌋ + 1, ⌊(W − 1) / stride⌋ + 1). Size 2 stride 2 on even sizes is a plain 2×2 pool;
    size 2 stride 1 (yolov3-tiny's last pool) keeps the size, the last row and column compared with −∞ only."""

    def __init__(self, size: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.size, self.stride = size, stride

    def forward(self, x: Tensor) -> Tensor:
        before = (self.size - 1) // 2
        after = self.size - 1 - before
        x = nn.functional.pad(x, (before, after, before, after), value=float("-inf"))
        return nn.functional.max_pool2d(x, self.size, self.stride)
