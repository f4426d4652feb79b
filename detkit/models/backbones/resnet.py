"""ResNet (He et al. 2016) as a detection backbone: the stem and the four stages, returning C2–C5.

At the standard width (64) the layers are torchvision's own ``resnet18/34/50/101/152(weights=None)`` without the
classifier, as ``torchvision.models.detection`` builds them when given no weights: BatchNorm layers stay
trainable. ``frozen_bn`` and ``trainable_layers`` build them as it does from pretrained weights instead
(``FrozenBatchNorm2d``; the stem and the first stages frozen). A reduced ``width`` (the stem's channels;
stages have width·(1, 2, 4, 8) planes) and fewer blocks per stage (``depths``) give small backbones for CPU
runs, with torchvision's block classes and initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detkit.convert.pretrained import load_state_dict
from detkit.models.backbones.conv_options import replace_3x3_convs, stage_indices
from detkit.models.backbones.darknet import StagedBackbone
from detkit.models.deformable import DeformableConv2d

__all__ = ["ResNet"]

_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
           101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


def _stage(block: type[nn.Module], c_in: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """torchvision's ``ResNet._make_layer`` for any width: a projection shortcut where the shape changes."""
    out = planes * block.expansion
    down = None
    if stride != 1 or c_in != out:
        down = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(c_in, planes, stride, down)] + [block(out, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class ResNet(StagedBackbone):
    """ResNet C2–C5: four maps of strides 4, 8, 16, 32.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
        width: channels of the stem; 64 is the standard network (torchvision's), smaller values shrink every
            stage in proportion.
        depths: blocks per stage, overriding the depth's (e.g. ``[1, 1, 1, 1]`` for a tiny CPU backbone).
        pretrained: a local torchvision state dict file of the same architecture, or a torchvision weights
            name (``ResNet50_Weights.IMAGENET1K_V1``; see :mod:`detkit.convert.pretrained`); ``fc.*`` is ignored.
        frozen_bn: ``torchvision.ops.FrozenBatchNorm2d`` (fixed statistics and affine, ε 1e-5 unless
            ``model.bn_eps`` says otherwise) instead of BatchNorm2d, as torchvision's detectors built from
            pretrained weights have; standard width only.
        trainable_layers: torchvision's ``trainable_backbone_layers``: how many of layer4, layer3, layer2,
            layer1 and the stem (counted from the top) keep gradients; 5 trains everything, 3 is torchvision's
            detectors' default from pretrained weights.
        deform_stages: indices of the stages (0 = C2 … 3 = C5) whose blocks' 3×3 convs (a bottleneck's conv2,
            both convs of a basic block) become :class:`~detkit.models.deformable.DeformableConv2d` with zero
            offsets, after the weights are initialised or loaded (the paper's ResNet-101 setting is ``[3]``).

    ``out_channels``: channels of C2–C5 (256, 512, 1024, 2048 for ResNet-50; 64, 128, 256, 512 for ResNet-18).
    Forward: (B, 3, H, W) → [C2, C3, C4, C5], (B, out_channels[i], H/2^(i+2), W/2^(i+2)) (rounded up).
    """

    num_outputs = 4

    def __init__(self, depth: int = 50, width: int = 64, depths: Sequence[int] | None = None,
                 pretrained: str | None = None, frozen_bn: bool = False, trainable_layers: int = 5,
                 deform_stages: Sequence[int] | None = None) -> None:
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5 (5: the stem and all four stages), got "
                             f"{trainable_layers}")
        if depth not in _DEPTHS:
            raise ValueError(f"unknown ResNet depth {depth}; expected one of {sorted(_DEPTHS)}")
        if width < 1:
            raise ValueError(f"ResNet width must be a positive number of channels, got {width}")
        block, default_depths = _DEPTHS[depth]
        depths = tuple(depths or default_depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"ResNet depths must be 4 positive block counts, got {list(depths)}")
        standard = width == 64 and depths == default_depths
        if frozen_bn and not standard:
            raise ValueError("frozen_bn is for torchvision's standard ResNets (width 64, default depths)")
        if standard:
            net = getattr(torchvision.models, f"resnet{depth}")(weights=None,
                                                                 norm_layer=FrozenBatchNorm2d if frozen_bn else None)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            stages, c_in = [], width
            for i, blocks in enumerate(depths):
                stages.append(_stage(block, c_in, width * 2**i, blocks, 1 if i == 0 else 2))
                c_in = width * 2**i * block.expansion
            self.stages = nn.ModuleList(stages)
            _init_like_torchvision(self)
        self.out_channels = [width * 2**i * block.expansion for i in range(4)]
        if pretrained:
            self.load_torchvision_state(load_state_dict(pretrained))
        for i in stage_indices(deform_stages, 4, "deform_stages"):
            replace_3x3_convs(self.stages[i], DeformableConv2d.from_conv)
        frozen = [self.stem, *self.stages][: 5 - trainable_layers]  # after the swap: its convs freeze too
        for module in frozen:
            module.requires_grad_(False)

    def load_torchvision_state(self, state: dict[str, Tensor]) -> None:
        """Load a ``torchvision.models.resnetXX`` state dict (classifier entries ignored); deformable convs take
        its conv weights and keep their own offset predictors."""
        from detkit.convert.tv_rcnn import resnet_state

        own_offsets = {key: value for key, value in self.state_dict().items() if ".offset." in key}
        self.load_state_dict({**own_offsets, **resnet_state(state)})
