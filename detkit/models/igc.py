"""Interleaved group convolution (IGC; Zhang, Qi, Xiao & Wang, "Interleaved Group Convolutions for Deep Neural
Networks", ICCV 2017), a drop-in replacement for a dense k×k convolution.

A primary group convolution (L groups, k×k) mixes channels only within each group; the channels are then
interleaved so that every secondary group holds channels of every primary group, a secondary group
convolution (M groups, 1×1) mixes within those, and the inverse interleave restores the primary order. As in
the paper there is no normalisation or activation between the two: the block is one linear map, a dense
convolution with a structured sparse kernel, at a fraction of its parameters and FLOPs.
"""

from __future__ import annotations

from torch import Tensor, nn

from detkit.errors import ConfigError

__all__ = ["interleave", "InterleavedGroupConv", "igc_params"]


def interleave(x: Tensor, groups: int) -> Tensor:
    """(B, C, H, W) whose channels are ``groups`` contiguous groups of C / groups → the channels reordered so
    that output channel ``n · groups + g`` is the n-th channel of group g (ShuffleNet's channel shuffle).
    ``interleave(x, C // groups)`` is the inverse."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def igc_params(in_channels: int, out_channels: int, primary_groups: int, secondary_groups: int,
               kernel: int = 3) -> int:
    """Weights of an :class:`InterleavedGroupConv` (no biases): k²·(C_in / L)·C_out + C_out²/M. With
    C_in = C_out = C = L·M: C·(k²·M + L), against a dense conv's k²·C²."""
    return kernel * kernel * in_channels // primary_groups * out_channels + out_channels**2 // secondary_groups


class InterleavedGroupConv(nn.Module):
    """primary (k×k, L groups, C_in → C_out) → interleave → secondary (1×1, M groups, C_out → C_out) →
    interleave back; (B, C_in, H, W) → (B, C_out, H / stride, W / stride), no bias (a BatchNorm follows).

    ``C_out`` must be a multiple of L·M: each secondary group then receives C_out / (L·M) channels from every
    primary group (exactly one in the paper's C = L·M), so every output channel depends on every input
    channel. ``C_in`` must be a multiple of L.

    Args:
        in_channels, out_channels: C_in, C_out. primary_groups: L. secondary_groups: M.
        kernel, stride: of the primary conv ('same' padding, kernel // 2).
    """

    def __init__(self, in_channels: int, out_channels: int, primary_groups: int, secondary_groups: int,
                 kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        if primary_groups < 1 or secondary_groups < 1:
            raise ConfigError(f"IGC groups must be positive, got L={primary_groups}, M={secondary_groups}")
        if in_channels % primary_groups or out_channels % (primary_groups * secondary_groups):
            raise ConfigError(
                f"IGC with L={primary_groups}, M={secondary_groups} needs input channels divisible by L and output "
                f"channels divisible by L·M = {primary_groups * secondary_groups}; got {in_channels} → "
                f"{out_channels} channels")
        self.primary_groups, self.secondary_groups = primary_groups, secondary_groups
        self.primary = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=primary_groups,
                                 bias=False)
        self.secondary = nn.Conv2d(out_channels, out_channels, 1, groups=secondary_groups, bias=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, primary_groups: int, secondary_groups: int) -> InterleavedGroupConv:
        """An IGC block with ``conv``'s channels, kernel and stride (new weights: the structure differs)."""
        if conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1 or conv.dilation != (1, 1):
            raise ValueError(f"IGC replaces a square, ungrouped, undilated conv, got {conv}")
        return cls(conv.in_channels, conv.out_channels, primary_groups, secondary_groups, conv.kernel_size[0],
                   conv.stride[0]).to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = interleave(self.primary(x), self.primary_groups)
        x = self.secondary(x)
        return interleave(x, x.shape[1] // self.primary_groups)
