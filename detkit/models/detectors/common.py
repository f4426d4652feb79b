"""What every detector shares: input normalisation, batching, training-target checks and config values.

The common interface (torchvision's): ``images`` are 0–1 RGB, a (B, 3, H, W) tensor or a list of same-size
(3, H, W) tensors; ``targets`` one dict per image with ``boxes`` (N, 4) xyxy pixels of ``images`` and
``labels`` (N,) 0-based. Detectors normalise inside the model, as torchvision's do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "plain", "register_normalization", "normalize", "stack_images",
           "batch_images", "check_targets"]

# ImageNet statistics of 0–1 RGB images: the default normalisation of detectors with ImageNet-style backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def plain(value, container: type = list):
    """``value`` with every nested sequence (Hydra's ListConfig included) made a ``container`` (list or tuple):
    plain values keep cache keys and box-generation code simple. Strings are left as they are."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return container(plain(v, container) for v in value)
    return value


def register_normalization(module: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
    """Give ``module`` non-persistent buffers ``image_mean`` and ``image_std``, (1, 3, 1, 1) each, per RGB
    channel of 0–1 images (not in the state dict: checkpoints do not depend on them)."""
    module.register_buffer("image_mean", torch.tensor(plain(mean)).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("image_std", torch.tensor(plain(std)).view(1, 3, 1, 1), persistent=False)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B, 3, H, W) 0–1 images → (images − mean) / std, ``mean`` and ``std`` (1, 3, 1, 1)."""
    return (images - mean) / std


def stack_images(images: Tensor | Sequence[Tensor]) -> Tensor:
    """(B, 3, H, W) from a batch tensor or a list of same-size (3, H, W) tensors; a clear error otherwise."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return images
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images in a batch must share one size (letterbox them first), got {sorted(sizes)}")
    return torch.stack(list(images))


def batch_images(images: Tensor | Sequence[Tensor], mean: Tensor, std: Tensor, size_divisible: int) -> Tensor:
    """0–1 RGB images, (B, 3, H, W) or a list of (3, H, W) → normalised (B, 3, H', W'), zero-padded at the bottom
    and right to the largest image (images of different sizes, as torchvision's R-CNN transform batches them)
    and then to multiples of ``size_divisible`` (so every pyramid level halves the previous one)."""
    if not isinstance(images, Tensor) and len({tuple(im.shape) for im in images}) > 1:
        if any(im.dim() != 3 or im.shape[0] != 3 for im in images):
            raise ValueError(f"expected (3, H, W) images, got {sorted({tuple(im.shape) for im in images})}")
        h, w = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
        x = torch.stack([F.pad(normalize(im[None], mean, std)[0], (0, w - im.shape[2], 0, h - im.shape[1]))
                         for im in images])
    else:
        images = stack_images(images)
        if images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        x = normalize(images, mean, std)
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % size_divisible, -w % size_divisible
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def check_targets(targets: Sequence[Mapping] | None, batch: int, num_classes: int | None = None
                  ) -> Sequence[Mapping]:
    """``targets`` if a training step can use them: one dict per image of the batch. With ``num_classes`` K,
    also ``boxes`` (N, 4) with N ``labels`` in 0..K−1 (these checks read the labels: a device sync on GPU).
    Otherwise a ValueError in one line saying what is wrong."""
    if targets is None:
        raise ValueError("targets are required in training mode: call model(images, targets), or model.eval() "
                         "for detections")
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for {batch} images")
    if num_classes is None:
        return targets
    for i, t in enumerate(targets):
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(labels) != len(boxes):
            raise ValueError(f"target {i}: boxes must be (N, 4) with N labels, got boxes {tuple(boxes.shape)} "
                             f"and {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"target {i}: labels must be in 0..{num_classes - 1}, got {labels.tolist()}")
    return targets
