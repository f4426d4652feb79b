import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from detkit.engine.optim import CosineSchedule, StepSchedule, adamw, build_scheduler, param_groups, sgd
from tests.conftest import compose_config


def test_warmup_then_cosine_to_final_factor():
    cosine = CosineSchedule(100, 10, final_factor=0.05)
    assert cosine(0) == pytest.approx(1e-3)
    assert cosine(5) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert cosine(10) == pytest.approx(1.0)
    assert CosineSchedule(100, 10, final_factor=0.0)(55) == pytest.approx(0.5)
    assert cosine(100) == pytest.approx(0.05)
    values = [cosine(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_schedule():
    step = StepSchedule(100, 0, milestones=[0.7, 0.9], gamma=0.1)
    assert step(69) == 1.0
    assert step(70) == pytest.approx(0.1)
    assert step(95) == pytest.approx(0.01)


def test_no_weight_decay_on_batchnorm_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN γ and β, linear bias
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for optimizer in (adamw(model, 1e-3, 0.1, momentum=0.9), sgd(model, 1e-3, 0.1, momentum=0.9, nesterov=True)):
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert adamw(model, 1e-3, 0.1, momentum=0.8).param_groups[0]["betas"] == (0.8, 0.999)


def test_configs_choose_optimizer_and_schedule_by_target():
    model = nn.Linear(2, 2)
    for name, kind in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        optim = dict(compose_config("train", [f"optim={name}"]).optim)
        del optim["reference_batch"], optim["lr_scaling"]
        assert type(instantiate(optim)(model)) is kind
    for name, kind in (("cosine", CosineSchedule), ("step", StepSchedule)):
        sched = dict(compose_config("train", [f"schedule={name}"]).schedule)
        del sched["warmup_steps"]
        assert type(instantiate(sched)(100, 10)) is kind


def test_single_step_run_without_warmup_ends_at_the_final_factor():
    # warmup_steps=0 and total_steps=1: the cosine span is clamped to one step, not a division by zero
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, 1, 0, final_factor=0.05)
    assert scheduler.get_last_lr() == [1.0]
    assert scheduler.lr_lambdas[0](1) == pytest.approx(0.05)
    scheduler.lr_lambdas[0].total_steps = 4  # a budget's re-plan
    assert scheduler.lr_lambdas[0](2) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: cos(π/2) = 0


def test_warmup_is_counted_in_steps_and_capped_to_a_fraction_of_the_planned_run():
    cosine = CosineSchedule(10_000, 125, final_factor=0.05, max_warmup_fraction=0.05)
    assert cosine.warmup == 125 and cosine(125) == pytest.approx(1.0) and cosine(62) < 0.5
    cosine.total_steps = 400  # a time budget on a small dataset re-plans the run: warmup shrinks with it
    assert cosine.warmup == 20 and cosine(20) == pytest.approx(1.0) and cosine(10) == pytest.approx(
        1e-3 + (1 - 1e-3) * 0.5)
    assert cosine(400) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="max_warmup_fraction"):
        CosineSchedule(100, 10, final_factor=0.05, max_warmup_fraction=1.5)


def test_the_default_schedule_warms_up_over_the_same_steps_whatever_the_epoch_length():
    from detkit.app.build import build_optimization

    model = nn.Linear(2, 2)
    warmups = []
    for steps_per_epoch in (40, 500):
        cfg = compose_config("train", ["trainer.epochs=100"])
        _, scheduler = build_optimization(cfg, model, steps_per_epoch)
        warmups.append(scheduler.lr_lambdas[0].warmup)
    assert warmups == [cfg.schedule.warmup_steps] * 2
