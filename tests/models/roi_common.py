"""What the Fast R-CNN and G-CNN tests share: building a model from its config, one torch thread."""

import pytest
import torch

from detkit.app.build import build_model
from tests.conftest import compose_config

# A full (VGG16) config at a width that builds in a blink: same pooling, grid and steps as the paper's.
SMALL_VGG = ["model.backbone.width=0.0625", "model.representation=32"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: extra threads on a shared CPU only wait for each other
    yield
    torch.set_num_threads(threads)


def build(name: str, *overrides: str, num_classes: int = 3):
    """``configs/model/<name>.yaml`` with ``overrides``, built by the trainer's ``build_model``, seed 0."""
    torch.manual_seed(0)
    return build_model(compose_config("train", [f"model={name}", *overrides]).model, num_classes)
