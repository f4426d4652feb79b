"""The overfit check every detector test runs: the loss falls on a tiny batch, then the boxes are found."""

import torch
from torchvision.ops import box_iou


def overfit(model, images, targets, steps: int, lr: float, shrink: float) -> None:
    """AdamW for ``steps`` on one batch; the loss must end below ``shrink`` times its first value."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    first = loss = None
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < shrink * first, (loss.item(), first)


def assert_finds_the_boxes(model, images, targets, score: float = 0.3) -> None:
    """In eval mode, every target box has a detection of its class scoring > ``score`` at IoU > 0.5."""
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, target in zip(detections, targets):
        confident = det["scores"] > score
        iou = box_iou(target["boxes"], det["boxes"][confident])
        labels_match = target["labels"][:, None] == det["labels"][confident][None]
        assert ((iou > 0.5) & labels_match).any(dim=1).all(), (iou, det)
