"""Low-rank decomposition: full rank reproduces the outputs, lower energy removes parameters."""

import pytest
import torch
from torch import nn

from detkit.compression.lowrank import (
    apply_lowrank_spec,
    decompose_model,
    energy_rank,
    lowrank_spec,
    svd_layers,
    tucker2_layers,
)
from tests.compression.detector_fixtures import one_thread, tiny_yolo  # noqa: F401


def test_energy_rank_keeps_the_smallest_rank_holding_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25
    assert energy_rank(s, 0.6) == 1 and energy_rank(s, 0.7) == 2 and energy_rank(s, 0.95) == 3
    assert energy_rank(s, 1.0) == 4
    with pytest.raises(ValueError, match="energy"):
        energy_rank(s, 0.0)


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(6, 9, 1, stride=2, padding=1),
                                   nn.Conv2d(5, 8, 3, stride=2, padding=2, dilation=2)])
def test_single_layer_at_full_rank_is_reproduced(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 11, 11)
    one_by_one = isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)
    replacement, _ = (svd_layers if one_by_one else tucker2_layers)(layer, 1.0)
    torch.testing.assert_close(replacement(x), layer(x), atol=1e-5, rtol=0)


def test_detector_at_full_rank_reproduces_raw_outputs_and_lower_energy_shrinks_it():
    model, images = tiny_yolo(), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.raw_outputs(images)
    report = decompose_model(model, energy=1.0, skip_if_larger=False)
    assert report.rows and isinstance(model.heads[0][-1], nn.Sequential)
    with torch.no_grad():
        for out, ref in zip(model.raw_outputs(images), reference):
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    small = tiny_yolo()
    report = decompose_model(small, energy=0.5, exclude=["heads"])
    assert report.params_after < report.params_before
    assert all(not name.startswith("heads") for name, *_ in report.rows)
    assert "tucker2" in report.format() and "svd" in report.format()
    losses = small.train()(torch.rand(2, 3, 64, 64), [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
                                                       "labels": torch.tensor([1])}] * 2)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_spec_rebuilds_the_factorised_architecture_for_a_checkpoint():
    model = tiny_yolo()
    spec = lowrank_spec(decompose_model(model, energy=0.6, exclude=["heads"]))
    rebuilt = tiny_yolo()
    apply_lowrank_spec(rebuilt, spec)
    rebuilt.load_state_dict(model.state_dict())  # same keys and shapes
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.raw_outputs(images), rebuilt.raw_outputs(images)):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="does not have"):
        apply_lowrank_spec(tiny_yolo(), {"nope.conv": [2]})
    with pytest.raises(ValueError, match="outside"):
        apply_lowrank_spec(tiny_yolo(), {"heads.0.1": [10_000]})
