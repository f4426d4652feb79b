"""Shared by the compression tests on detectors: a seeded tiny YOLOv3 and one CPU thread per test."""

import torch
from hydra.utils import instantiate

from tests.conftest import compose_config
from tests.models.test_yolo_family import one_thread  # noqa: F401  (autouse fixture, re-exported)

TARGETS = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}] * 2


def tiny_yolo(train: bool = False) -> torch.nn.Module:
    """yolov3_cpu with 3 classes, seeded, in eval mode unless ``train``."""
    torch.manual_seed(0)
    model = instantiate(compose_config("train", ["model=yolov3_cpu"]).model, num_classes=3)
    return model.train(train)
