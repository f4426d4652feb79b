"""Deformable convolution and deformable RoI pooling, v1 (Dai et al., "Deformable Convolutional Networks",
ICCV 2017).

A deformable convolution moves each of its k² sampling points by an offset that a plain convolution predicts
from the same input; deformable RoI pooling moves each of the P×P bins of a RoI by an offset that a fully
connected layer predicts from the RoI's regular pooled features. Both offset predictors start at zero, so a
new deformable layer computes exactly what the regular layer does and learns to deform from there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, MultiScaleRoIAlign, deform_conv2d

from detkit.errors import ConfigError
from detkit.models.roi_heads import SingleLevelPooler

__all__ = ["DeformableConv2d", "deformable_roi_align", "DeformableRoIPooler"]


class DeformableConv2d(DeformConv2d):
    """A k×k convolution with learned sampling offsets: ``torchvision.ops.deform_conv2d`` (no mask, v1).

    ``offset`` is a plain convolution with this layer's kernel, stride, padding and dilation that predicts
    2·k² channels per output pixel, a (Δy, Δx) pair in input pixels for each kernel point in row-major order
    (torchvision's layout); its weight and bias start at zero. Parameters ``weight`` (C_out, C_in / groups,
    k, k) and ``bias`` are named as ``nn.Conv2d``'s, so a plain conv's state dict loads into this layer with
    only the ``offset.*`` entries missing. (B, C_in, H, W) → (B, C_out, H_out, W_out) as ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        kh, kw = self.kernel_size
        self.offset = nn.Conv2d(in_channels, 2 * kh * kw, self.kernel_size, self.stride, self.padding,
                                self.dilation)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> DeformableConv2d:
        """The deformable version of ``conv``: its geometry and a copy of its weights, zero offsets."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"a deformable conv pads with zeros by a number of pixels; got padding "
                             f"{conv.padding!r}, padding_mode {conv.padding_mode!r}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None).to(conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        offset = self.offset(x)
        # torchvision's CPU kernel has no bfloat16 or float16, and only CUDA has an autocast rule for the op:
        # compute in float32 as that rule does, and return the input's dtype.
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(x.float(), offset.float(), self.weight.float(), bias, self.stride, self.padding,
                                self.dilation)
        return out.to(x.dtype)


def deformable_roi_align(x: Tensor, rois: Tensor, offsets: Tensor, output_size: int, spatial_scale: float,
                         sampling_ratio: int = 2, aligned: bool = True) -> Tensor:
    """RoIAlign whose bins are moved by ``offsets``: each bin is averaged over its S×S bilinear samples exactly
    as ``torchvision.ops.roi_align`` samples it, at the bin's position plus its offset.

    Args:
        x: feature map (B, C, H, W).
        rois: (K, 5) rows ``[batch index, x1, y1, x2, y2]``, xyxy in input pixels.
        offsets: (K, P, P, 2) per bin (row, column) a (Δx, Δy) shift in input pixels.
        output_size: P. spatial_scale: map pixels per input pixel. sampling_ratio: S ≥ 1, samples per bin side.
        aligned: ``roi_align``'s half-pixel correction (without it a RoI is at least one map pixel wide, as there).

    Returns (K, C, P, P); with zero offsets, ``roi_align(x, rois, P, spatial_scale, S, aligned)`` up to float
    rounding. A sample more than one pixel outside the map counts as zero, one within a pixel of the edge takes
    the edge's value (``roi_align``'s rule). Differentiable in ``x`` and in ``offsets``: the samples are taken
    with ``grid_sample`` (``roi_align`` itself has no gradient for its boxes, so it could not train offsets).
    """
    if sampling_ratio < 1:
        raise ConfigError(f"deformable RoI pooling needs a fixed sampling_ratio >= 1 (samples per bin side), got "
                          f"{sampling_ratio}")
    size, samples = int(output_size), int(sampling_ratio)
    if offsets.shape != (len(rois), size, size, 2):
        raise ValueError(f"offsets must be (K, P, P, 2) = ({len(rois)}, {size}, {size}, 2), got "
                         f"{tuple(offsets.shape)}")
    height, width = x.shape[-2:]
    # Positions in float32 at least (bfloat16 would round a 200-pixel coordinate to whole pixels), and the
    # samples taken at that precision too (grid_sample wants one dtype).
    dtype = torch.promote_types(x.dtype, torch.float32)
    features = x.to(dtype)
    boxes = rois[:, 1:].to(dtype) * spatial_scale - (0.5 if aligned else 0.0)  # map pixels
    sides = boxes[:, 2:] - boxes[:, :2]
    if not aligned:
        sides = sides.clamp(min=1.0)
    bins = sides / size  # (K, 2): bin (w, h)
    # A sample's position inside the RoI, in bins: bin index + (s + 0.5) / S, as roi_align places it.
    steps = (torch.arange(size, device=x.device, dtype=dtype)[:, None]
             + (torch.arange(samples, device=x.device, dtype=dtype) + 0.5) / samples)  # (P, S)
    shift = offsets.to(dtype) * spatial_scale
    # (K, P row, P column, S row sample, S column sample)
    px = (boxes[:, 0, None, None] + steps * bins[:, 0, None, None])[:, None, :, None, :] + shift[..., 0, None, None]
    py = (boxes[:, 1, None, None] + steps * bins[:, 1, None, None])[:, :, None, :, None] + shift[..., 1, None, None]
    px, py = torch.broadcast_tensors(px, py)
    inside = ((px >= -1) & (px <= width) & (py >= -1) & (py <= height)).to(dtype)
    # With align_corners=True, -1 and 1 are the centres of the first and last pixels.
    gx = 2 * px.clamp(0, width - 1) / max(width - 1, 1) - 1
    gy = 2 * py.clamp(0, height - 1) / max(height - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=-1)  # (K, P, P, S, S, 2)
    out = features.new_zeros((len(rois), x.shape[1], size, size))
    image_index = rois[:, 0].long()
    for b in range(x.shape[0]):
        idx = torch.nonzero(image_index == b).squeeze(1)
        if len(idx) == 0:
            continue
        sampled = F.grid_sample(features[b : b + 1], grid[idx].reshape(1, -1, samples, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=True)  # (1, C, n·P·P·S, S)
        sampled = sampled.view(x.shape[1], len(idx), size, size, samples, samples) * inside[idx]
        out = out.index_copy(0, idx, sampled.mean((-2, -1)).permute(1, 0, 2, 3))
    return out.to(x.dtype)


class DeformableRoIPooler(nn.Module):
    """Deformable RoI pooling v1 around a RoIAlign pooler (a ``roi_align`` :class:`~detkit.models.roi_heads.
    SingleLevelPooler` or FPN's ``MultiScaleRoIAlign``); the same call shape, (features, rois, image_sizes) →
    (R, C, P, P).

    The regular pooler's (R, C, P, P) output goes through ``offset``, one fully connected layer to 2·P² values
    (zero weights and bias at the start), the normalised offsets Δp̂ per bin. A bin's shift in input pixels is
    Δp = γ · Δp̂ ∘ (w, h) with the RoI's width and height, γ = ``gamma`` (0.1 in the paper), so the offsets do
    not depend on the RoI's scale. The bins are then pooled again at their shifted places with
    :func:`deformable_roi_align`, from the map (FPN: the level) the regular pooler used for that RoI.

    Args:
        pooler: the RoIAlign pooler. in_channels: C of the pooled features. gamma: γ.
    """

    def __init__(self, pooler: nn.Module, in_channels: int, gamma: float = 0.1) -> None:
        super().__init__()
        if isinstance(pooler, SingleLevelPooler):
            if pooler.kind != "roi_align":
                raise ConfigError("deformable RoI pooling samples bins bilinearly as RoIAlign does: set the "
                                  f"pooler to roi_align (got {pooler.kind})")
            size = pooler.output_size
        elif isinstance(pooler, MultiScaleRoIAlign):
            size = pooler.output_size[0]
        else:
            raise ConfigError(f"deformable RoI pooling wraps a SingleLevelPooler or MultiScaleRoIAlign, got "
                              f"{type(pooler).__name__}")
        self.pooler, self.size, self.gamma = pooler, int(size), float(gamma)
        self.offset = nn.Linear(in_channels * self.size * self.size, 2 * self.size * self.size)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def bin_offsets(self, pooled: Tensor, rois: Sequence[Tensor]) -> Tensor:
        """(R, C, P, P) regular pooled features, per image (N_i, 4) xyxy RoIs → (R, P, P, 2) (Δx, Δy) pixels."""
        boxes = torch.cat(list(rois)).to(pooled.dtype)
        wh = boxes[:, 2:] - boxes[:, :2]
        normalised = self.offset(pooled.flatten(1)).view(-1, self.size, self.size, 2)
        return self.gamma * normalised * wh[:, None, None, :]

    def forward(self, features: Tensor | Mapping[str, Tensor], rois: Sequence[Tensor],
                image_sizes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        pooled = self.pooler(features, rois, image_sizes)
        offsets = self.bin_offsets(pooled, rois)
        indexed = torch.cat([torch.cat([r.new_full((len(r), 1), i), r], dim=1) for i, r in enumerate(rois)])
        indexed = indexed.to(pooled.dtype)
        if isinstance(self.pooler, SingleLevelPooler):
            x = self.pooler.feature_map(features)
            return deformable_roi_align(x, indexed, offsets, self.size, self.pooler.spatial_scale,
                                        self.pooler.sampling_ratio, self.pooler.aligned)
        # MultiScaleRoIAlign: its first call set up the level scales and the RoI → level mapping it used.
        levels = self.pooler.map_levels(list(rois))
        out = pooled.new_zeros(pooled.shape)
        for level, (name, scale) in enumerate(zip(self.pooler.featmap_names, self.pooler.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            if len(idx):
                level_out = deformable_roi_align(features[name], indexed[idx], offsets[idx], self.size, scale,
                                                 self.pooler.sampling_ratio, aligned=False)
                out = out.index_copy(0, idx, level_out.to(out.dtype))
        return out
