import math

import pytest
import torch
from torch import nn

from detkit.engine.optim import build_optimizer, lr_factor, param_groups


def test_warmup_then_cosine_to_final_factor():
    assert lr_factor(0, 100, 10) == pytest.approx(1e-3)
    assert lr_factor(5, 100, 10) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, final_factor=0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, final_factor=0.05) == pytest.approx(0.05)
    values = [lr_factor(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_policy_and_unknown_policy():
    assert lr_factor(69, 100, 0, "step") == 1.0
    assert lr_factor(70, 100, 0, "step") == pytest.approx(0.1)
    assert lr_factor(95, 100, 0, "step") == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, 10, 0, "linear-ish")


def test_no_weight_decay_on_batchnorm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN γ and β, linear bias and no_decay["weight_decay"] == 0.0
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.1), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "lion", 1e-3)
    assert not math.isnan(lr_factor(0, 1, 0))
