"""detkit's FPN R-CNN and RetinaNet against torchvision's ``fasterrcnn_resnet50_fpn`` and
``retinanet_resnet50_fpn`` for ``tools/benchmark.py twostage``: same architecture sizes, same batch, a training
step and inference timed in interleaved repetitions (theirs, ours, theirs, ours …), median and ratio.

Both sides are built at random init on the same ResNet depth. torchvision's models resize their inputs to
``min_size``; here ``min_size = max_size =`` the batch's side, so both see the same pixels. Post-processing
settings are the same (RPN top-k 2000/1000 train/test, 512 RoIs per image; score 0.05, NMS 0.5, 100
detections). RetinaNet takes P6 from P5 as torchvision's v1 does.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.benchmark import Timing, inference_fn, synthetic_batch, train_step_fn
from detkit.utils.timing import interleaved_medians

__all__ = ["twostage_models", "twostage_timings"]


def _torchvision_backbone(depth: int, retinanet: bool) -> nn.Module:
    """torchvision's ResNet-FPN extractor as its ``*_resnet50_fpn`` builders make it without weights (all
    layers trainable, plain BatchNorm), at any depth."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    extra = dict(returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)) if retinanet else {}
    return resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=nn.BatchNorm2d,
                               trainable_layers=5, **extra)


def twostage_models(num_classes: int = 20, depth: int = 50, size: int = 512) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{"fpn_rcnn": (torchvision, detkit), "retinanet": (torchvision, detkit)}`` for ``num_classes`` object
    classes (torchvision's Faster R-CNN counts the background too) on ResNet-``depth``, inputs of side ``size``."""
    from torchvision.models.detection import FasterRCNN, RetinaNet, fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn

    from detkit.models.backbones.resnet import ResNet
    from detkit.models.detectors.fpn_rcnn import FPNRCNN
    from detkit.models.detectors.retinanet import RetinaNet as DetkitRetinaNet

    resize = dict(min_size=size, max_size=size)
    if depth == 50:
        tv_rcnn = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1, **resize)
        tv_retina = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **resize)
    else:
        tv_rcnn = FasterRCNN(_torchvision_backbone(depth, False), num_classes + 1, **resize)
        tv_retina = RetinaNet(_torchvision_backbone(depth, True), num_classes, **resize)
    ours_rcnn = FPNRCNN(num_classes, ResNet(depth))
    ours_retina = DetkitRetinaNet(num_classes, ResNet(depth), p6_from="p5")
    return {"fpn_rcnn": (tv_rcnn, ours_rcnn), "retinanet": (tv_retina, ours_retina)}


def twostage_timings(repeats: int, batch: int = 2, size: int = 512, num_classes: int = 20, depth: int = 50,
                     warmup: int = 1, seed: int = 0, device: str = "cpu") -> list[tuple[str, list[Timing]]]:
    """Four tables (FPN R-CNN and RetinaNet, training step and inference), torchvision first as the baseline;
    ``num_classes`` object classes (without the background)."""
    torch.manual_seed(seed)
    models = twostage_models(num_classes, depth, size)
    images, targets = synthetic_batch(batch, size, seed)
    targets = [{"boxes": t["boxes"], "labels": t["labels"] % num_classes} for t in targets]
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    # torchvision's Faster R-CNN counts the background as class 0; its RetinaNet has no background class.
    shifted = {"fpn_rcnn": [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets], "retinanet": targets}
    names = {"fpn_rcnn": ("torchvision fasterrcnn_resnet50_fpn", "detkit FPNRCNN"),
             "retinanet": ("torchvision retinanet_resnet50_fpn", "detkit RetinaNet")}
    shape = f"batch {batch} x 3 x {size} x {size}, {num_classes} classes, ResNet-{depth}, {device}"
    tables = []
    for key, (theirs, ours) in models.items():
        theirs, ours = theirs.to(device), ours.to(device)
        tv_name, our_name = names[key]
        if depth != 50:
            tv_name = tv_name.replace("resnet50", f"resnet{depth}")
        for title, fns in (("training step (forward, backward, SGD)",
                            {tv_name: train_step_fn(theirs, images, shifted[key]),
                             our_name: train_step_fn(ours, images, targets)}),
                           ("inference with post-processing", {tv_name: inference_fn(theirs, images),
                                                               our_name: inference_fn(ours, images)})):
            medians = interleaved_medians(fns, repeats, warmup, device)
            base = medians[tv_name]
            tables.append((f"{key} {title}, {shape}", [Timing(name, ms, base) for name, ms in medians.items()]))
    return tables
