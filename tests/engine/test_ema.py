import torch
from torch import nn

from detkit.engine.hooks.ema import ModelEMA


def test_ema_tracks_a_moving_average_with_ramped_decay():
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    expected = 0.0
    for step in range(1, 6):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        ema.update(model)
        d = 0.9 * (1 - torch.exp(torch.tensor(-step / 1.0))).item()
        expected = d * expected + (1 - d) * step
        assert torch.allclose(ema.module[0].weight, torch.full((1, 2), expected)), step
    # Integer buffers are copied, not averaged.
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_state_round_trip():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.5, tau=1.0)
    ema.update(model)
    other = ModelEMA(nn.Linear(3, 2), decay=0.5, tau=1.0)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(),
                                                 other.module.state_dict().values()))
