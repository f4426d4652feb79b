"""Darknet-19 (Redmon & Farhadi, YOLO9000): VGG-like 3×3 convs with 1×1 bottlenecks between them, batch
norm after every conv, 2×2 max-pools for downsampling; 18 convs + the classifier's 1×1."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkit.models.layers import ConvBNAct


def _stage(c_in: int, c_out: int, depth: int, act: str) -> nn.Sequential:
    # 3×3 at c_out alternating with 1×1 down to c_out / 2: depth 3×3 convs, depth − 1 bottlenecks between them.
    layers = [ConvBNAct(c_in, c_out, 3, act=act)]
    for _ in range(depth - 1):
        layers += [ConvBNAct(c_out, c_out // 2, 1, act=act), ConvBNAct(c_out // 2, c_out, 3, act=act)]
    return nn.Sequential(*layers)


class Darknet19(nn.Module):
    """Darknet-19 returning the feature maps of the last ``num_outputs`` stages.

    Args:
        depths: 3×3 convs per stage; (1, 1, 2, 2, 3, 3) is Darknet-19. Stage ``i`` follows ``i`` max-pools
            (stride ``2 ** i``) and has ``width * 2 ** i`` channels.
        width: channels of the first stage (32 in the paper); the width multiplier.
        num_outputs: how many of the deepest stages to return (2 → strides 16 and 32, what YOLOv2's passthrough
            needs).
        act: activation name (see :func:`detkit.models.layers.activation`).

    Input ``(B, 3, H, W)``, H and W multiples of ``2 ** (len(depths) - 1)``; output a list of
    ``(B, out_channels[i], H / strides[i], W / strides[i])`` maps, shallowest first.
    """

    def __init__(self, depths: Sequence[int] = (1, 1, 2, 2, 3, 3), width: int = 32, num_outputs: int = 2,
                 act: str = "leaky") -> None:
        super().__init__()
        if not 1 <= num_outputs <= len(depths):
            raise ValueError(f"num_outputs must be in 1..{len(depths)}, got {num_outputs}")
        channels = [width * 2**i for i in range(len(depths))]
        self.stages = nn.ModuleList(
            _stage(channels[i - 1] if i else 3, channels[i], depth, act) for i, depth in enumerate(depths)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.num_outputs = num_outputs
        self.out_channels = channels[-num_outputs:]
        self.strides = [2**i for i in range(len(depths))][-num_outputs:]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(self.pool(x) if i else x)
            features.append(x)
        return features[-self.num_outputs :]
