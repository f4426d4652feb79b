import pytest
import torch
from torch import nn


@pytest.fixture
def toy_batch():
    """Two 128×128 images with coloured rectangles whose colour is the class, and their targets."""
    colors = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
    boxes = [torch.tensor([[10.0, 12.0, 40.0, 50.0], [70.0, 60.0, 120.0, 100.0]]),
             torch.tensor([[30.0, 20.0, 60.0, 44.0], [20.0, 80.0, 44.0, 120.0], [90.0, 10.0, 118.0, 30.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([2, 0, 1])]
    images = torch.full((2, 3, 128, 128), 0.5)
    for i in range(2):
        for (x1, y1, x2, y2), label in zip(boxes[i].int().tolist(), labels[i].tolist()):
            images[i, :, y1:y2, x1:x2] = colors[label][:, None, None]
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


@pytest.fixture
def precise_batchnorm():
    """Set every BatchNorm's running statistics to those of one batch (precise BN), so that eval mode sees what
    training saw: after a fast overfit the momentum-averaged statistics lag behind the weights."""

    @torch.no_grad()
    def calibrate(model: nn.Module, images: torch.Tensor, targets: list[dict]) -> None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average: after one batch, exactly its statistics
        model.train()
        # Repeated so that the unbiased variance BN stores is ~ the biased one it normalised with in training.
        model(images.repeat(16, 1, 1, 1), list(targets) * 16)

    return calibrate
