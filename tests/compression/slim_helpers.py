"""Shared by the Network Slimming tests (not a conftest, so that it leaves the distillation tests alone)."""

import torch

from detkit.app.build import build_model
from tests.conftest import compose_config


def build_detector(name: str, *overrides: str, num_classes: int = 3, seed: int = 0):
    """A detector from ``configs/model/<name>.yaml`` with random weights and random BatchNorm statistics
    (γ in 0.5–1.5, β, running mean and variance), so that pruning has something to get wrong."""
    cfg = compose_config("train", [f"model={name}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()
