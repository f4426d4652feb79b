"""Lightweight torchvision backbones for any detkit detector: MobileNetV2, MobileNetV3, ShuffleNetV2, SqueezeNet.

Each wraps the classifier's feature extractor (random init, ``weights=None``: nothing is downloaded) and
returns the maps at its last ``num_outputs`` strides, shallowest first, with the ``out_channels`` and
``strides`` attributes that YOLOv3 and the other detectors read (as :class:`~detkit.models.backbones.darknet.
Darknet`). The tapped layers are found once at construction by a forward pass on a 128×128 zero image: for
each stride, the last layer that produces it.

Input ``(B, 3, H, W)``, H and W multiples of 32; output a list of ``(B, out_channels[i], H / strides[i],
W / strides[i])`` maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small, squeezenet1_0, squeezenet1_1
from torchvision.models.shufflenetv2 import ShuffleNetV2 as _TorchvisionShuffleNetV2

from detkit.convert.pretrained import load_prefixed

__all__ = ["TappedBackbone", "MobileNetV2", "MobileNetV3", "ShuffleNetV2", "SqueezeNet"]

_PROBE = 128


class TappedBackbone(nn.Module):
    """A sequential feature extractor whose outputs are tapped at the end of each of its deepest
    ``num_outputs`` strides."""

    def __init__(self, body: nn.Sequential, num_outputs: int = 3) -> None:
        super().__init__()
        self.body = body
        taps: dict[int, tuple[int, int]] = {}  # stride → (last layer index, channels)
        was_training = body.training
        body.eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, _PROBE, _PROBE)
            for i, layer in enumerate(body):
                x = layer(x)
                if _PROBE % x.shape[-1] == 0:
                    taps[_PROBE // x.shape[-1]] = (i, x.shape[1])
        body.train(was_training)
        strides = sorted(taps)
        if not 1 <= num_outputs <= len(strides):
            raise ValueError(f"num_outputs must be in 1..{len(strides)} for this backbone, got {num_outputs}")
        self.strides = strides[-num_outputs:]
        self.taps = [taps[s][0] for s in self.strides]
        self.out_channels = [taps[s][1] for s in self.strides]
        self.num_outputs = num_outputs

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for i, layer in enumerate(self.body[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                maps.append(x)
        return maps


class MobileNetV2(TappedBackbone):
    """MobileNetV2 (Sandler et al. 2018) at width multiplier ``width``; the final 1×1 expansion to 1280
    channels (a classifier's) is dropped unless ``last_conv``. ``pretrained``: a local
    ``torchvision.models.mobilenet_v2`` state dict file of the same width, or a weights name
    (``MobileNet_V2_Weights.IMAGENET1K_V1``); its ``features.*`` entries are read (the body's layout)."""

    def __init__(self, width: float = 1.0, num_outputs: int = 3, last_conv: bool = False,
                 pretrained: str | None = None) -> None:
        features = mobilenet_v2(weights=None, width_mult=width).features
        super().__init__(features if last_conv else features[:-1], num_outputs)
        if pretrained:
            load_prefixed(self.body, pretrained)


class MobileNetV3(TappedBackbone):
    """MobileNetV3 (Howard et al. 2019), ``arch`` ``large`` or ``small``, at width multiplier ``width``
    (squeeze-excitation and hard-swish as in the paper); the final 1×1 expansion is dropped unless
    ``last_conv``. ``pretrained``: a local ``torchvision.models.mobilenet_v3_{arch}`` state dict file of the
    same width, or a weights name (``MobileNet_V3_Large_Weights.IMAGENET1K_V1``); its ``features.*`` entries
    are read (the body's layout)."""

    def __init__(self, arch: str = "large", width: float = 1.0, num_outputs: int = 3,
                 last_conv: bool = False, pretrained: str | None = None) -> None:
        builders = {"large": mobilenet_v3_large, "small": mobilenet_v3_small}
        if arch not in builders:
            raise ValueError(f"MobileNetV3 arch must be 'large' or 'small', got {arch!r}")
        features = builders[arch](weights=None, width_mult=width).features
        super().__init__(features if last_conv else features[:-1], num_outputs)
        if pretrained:
            load_prefixed(self.body, pretrained)


class ShuffleNetV2(TappedBackbone):
    """ShuffleNetV2 (Ma et al. 2018): ``stage_channels`` (stem, stage 2, 3, 4) as torchvision's
    ``stages_out_channels`` without the final conv (x1.0: 24, 116, 232, 464; x0.5: 24, 48, 96, 192);
    channels of stages 2–4 must be even (the channel split)."""

    def __init__(self, stage_channels: Sequence[int] = (24, 116, 232, 464),
                 stage_repeats: Sequence[int] = (4, 8, 4), num_outputs: int = 3) -> None:
        if len(stage_channels) != 4 or len(stage_repeats) != 3 or any(c % 2 for c in stage_channels[1:]):
            raise ValueError(f"ShuffleNetV2 needs 4 stage_channels (stages 2-4 even) and 3 stage_repeats, got "
                             f"{list(stage_channels)} and {list(stage_repeats)}")
        net = _TorchvisionShuffleNetV2(list(stage_repeats), [*stage_channels, 1024])
        body = nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4)
        super().__init__(body, num_outputs)


class SqueezeNet(TappedBackbone):
    """SqueezeNet (Iandola et al. 2016) ``version`` ``1_0`` or ``1_1``; the first conv gets padding so that
    every map is exactly 1/stride of the input (torchvision's unpadded stem gives 63 px for 128)."""

    def __init__(self, version: str = "1_1", num_outputs: int = 3) -> None:
        builders = {"1_0": squeezenet1_0, "1_1": squeezenet1_1}
        if version not in builders:
            raise ValueError(f"SqueezeNet version must be '1_0' or '1_1', got {version!r}")
        features = builders[version](weights=None).features
        stem = features[0]
        stem.padding = (stem.kernel_size[0] // 2, stem.kernel_size[1] // 2)
        super().__init__(features, num_outputs)
