import pytest
import torch
from torch import nn

from detkit.app.train import train
from detkit.data.loader import build_loader
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import EMAHook, Hook, ScheduleHook, TimeBudgetHook
from detkit.engine.optim import build_scheduler
from detkit.engine.trainer import Trainer


class FakeClock:
    """Seconds that pass only when the test says so: the budget is tested on counted steps, not wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, images, targets):
        return {"loss": self.linear(images).square().mean()}


class StepWork(Hook):
    """Each optimizer step costs ``seconds`` (before the budget hook measures it, as a real step does)."""

    priority = 15

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def after_step(self, trainer) -> None:
        self.clock.now += self.seconds


class EvalWork(Hook):
    """An evaluation of ``seconds`` after every epoch, where the evaluation hook runs (after the budget hook
    noted the epoch's end)."""

    priority = 41

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def after_epoch(self, trainer) -> None:
        self.clock.now += self.seconds
        trainer.state.metrics = {"epoch": trainer.state.epoch + 1}


class StopAfter(Hook):
    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self, trainer) -> None:
        trainer.state.stop_requested = trainer.state.global_step == self.n


def toy_run(clock: FakeClock, *hooks: Hook, epochs: int = 1000, steps_per_epoch: int = 10,
            minutes: float = 1.0) -> tuple[Trainer, TimeBudgetHook]:
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    data = [(torch.rand(2), {"image_id": i}) for i in range(steps_per_epoch * 2)]
    loader = build_loader(data, 2, train=True)
    budget = TimeBudgetHook(minutes, started=clock(), eval_images=0, eval_every=1, final_seconds=0.0,
                            fixed_eval_seconds=1.0, log=lambda *a: None, clock=clock)
    scheduler = build_scheduler(optimizer, epochs * steps_per_epoch, 0, final_factor=0.0)
    trainer = Trainer(model, optimizer, loader, epochs,
                      [ScheduleHook(scheduler), StepWork(clock, 0.1), budget, EvalWork(clock, 2.0), *hooks])
    return trainer, budget


def test_a_budget_plans_the_run_to_end_inside_it_with_its_evaluations():
    clock = FakeClock()
    trainer, budget = toy_run(clock)
    trainer.train()
    state = trainer.state
    assert state.global_step == budget.planned == state.max_steps
    # a minute of 0.1 s steps with a 2 s evaluation after every 10-step epoch: 3 s an epoch, 20 epochs
    assert 0.9 * 60 <= clock.now <= 60.0, clock.now
    assert state.epochs == state.epoch and 180 <= state.global_step <= 200
    assert trainer.hooks[0].scheduler.lr_lambdas[0].total_steps == budget.planned  # the cosine follows the plan


def test_plan_moves_the_end_of_the_schedule_the_epochs_and_the_ema_ramp():
    trainer, _ = toy_run(FakeClock(), EMAHook(decay=0.99, tau=100.0), epochs=10, steps_per_epoch=4)
    assert trainer.state.total_steps == 40
    trainer.plan(14)
    assert trainer.state.total_steps == 14 and trainer.state.epochs == 4  # 3.5 epochs: the last one partial
    schedule = trainer.hooks[0].scheduler
    for _ in range(14):
        trainer.optimizer.step()
        schedule.step()
    assert trainer.lr == pytest.approx(0.0, abs=1e-9)  # cosine reached its floor at the planned end
    ema = next(h for h in trainer.hooks if isinstance(h, EMAHook))
    assert ema.planned_tau == pytest.approx(100.0 * 14 / 40)


class SpeedsUp(Hook):
    """Steps of ``slow`` seconds until step ``at``, then of ``fast`` (a job beside it ended, caches warmed)."""

    priority = 15

    def __init__(self, clock: FakeClock, slow: float, fast: float, at: int) -> None:
        self.clock, self.slow, self.fast, self.at = clock, slow, fast, at

    def after_step(self, trainer) -> None:
        self.clock.now += self.slow if trainer.state.global_step <= self.at else self.fast


@pytest.mark.parametrize("slow, fast", [(0.2, 0.1), (0.1, 0.2)])
def test_the_plan_follows_a_machine_that_speeds_up_or_slows_down(slow, fast):
    clock = FakeClock()
    trainer, budget = toy_run(clock, SpeedsUp(clock, slow, fast, at=30))
    trainer.hooks = [h for h in trainer.hooks if not isinstance(h, StepWork)]
    messages, plans = [], []
    budget.log = messages.append
    fit = budget._steps_that_fit
    budget._steps_that_fit = lambda *args: plans.append(fit(*args)) or plans[-1]
    trainer.train()
    assert trainer.state.global_step == budget.planned == trainer.state.max_steps
    assert len(plans) == 5, plans  # the first plan and the four corrections, each once
    # planned first at the first speed; the corrections at 10%, 25%, 50% and 75% of the plan measure the
    # steps since the previous one, so the run ends with its final evaluation just inside the budget (not
    # at 70% of it, as a plan kept at the first speed does when the steps get twice faster)
    assert 0.9 * 60 <= clock.now <= 60.0, clock.now
    assert any("steps/s over the last" in m for m in messages), messages


class SlowFirstStep(Hook):
    """The session's first step costs ``seconds`` (a GPU's cuDNN autotuning, lazy initialisation), measured as
    the trainer measures a step."""

    priority = 15

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds, self.steps = clock, seconds, 0

    def after_step(self, trainer) -> None:
        self.steps += 1
        if self.steps == 1:
            self.clock.now += self.seconds
            trainer.state.step_time = self.seconds


def test_a_slow_first_step_does_not_end_the_run_before_its_speed_is_measured():
    clock = FakeClock()
    messages = []
    trainer, budget = toy_run(clock, SlowFirstStep(clock, 35.0))
    budget.log = messages.append
    trainer.train()
    # the first step's 35 s, projected once more as the next step's, looked like more than the minute; the
    # steps after it (0.1 s, an evaluation of 2 s every 10) fill the 25 s left, final evaluation included
    assert trainer.state.global_step > 50, messages
    assert 0.9 * 60 <= clock.now <= 60.0, clock.now


def test_a_budget_already_spent_in_the_first_steps_ends_the_run():
    clock = FakeClock()
    trainer, budget = toy_run(clock, SlowFirstStep(clock, 90.0))
    trainer.train()
    assert trainer.state.global_step == 1 == budget.planned


def test_budget_planning_counts_the_evaluations_on_the_way():
    clock = FakeClock()
    hook = TimeBudgetHook(max_minutes=1.0, started=0.0, eval_images=0, eval_every=1, final_seconds=0.0,
                          fixed_eval_seconds=5.0, clock=clock)
    trainer, _ = toy_run(clock, epochs=100, steps_per_epoch=10)
    trainer.state.batch_size = 2
    every_epoch = hook._steps_that_fit(trainer, seconds_per_step=0.1)
    hook.eval_every = 1000
    end_only = hook._steps_that_fit(trainer, seconds_per_step=0.1)
    # 600 steps of 0.1 s fit in a minute, less one 5 s evaluation at the end; with one after every 10-step
    # epoch, an epoch costs 6 s: ten of them
    assert 540 <= end_only <= 550 and 95 <= every_epoch <= 100, (end_only, every_epoch)


def test_the_first_plan_reserves_the_evaluation_time_a_probe_measures():
    clock = FakeClock()
    probed = []

    def probe(model):  # an evaluation of 10 s (a two-stage detector's thousands of RoIs), 1 s spent probing
        probed.append(model)
        clock.now += 1.0
        return 10.0

    def first_plan(eval_probe):
        trainer, budget = toy_run(clock, epochs=100, steps_per_epoch=100, minutes=1.0)
        clock.now = budget.started = 0.0
        budget.eval_probe, budget.eval_every = eval_probe, 1000  # the final evaluation only
        trainer.hooks.append(StopAfter(budget.skip_steps + budget.measure_steps))
        trainer.train()
        return trainer, budget

    guessed = first_plan(None)[1].planned  # eval_images=0: only the fixed 1 s guessed
    trainer, budget = first_plan(probe)
    assert probed == [trainer.state.eval_model]
    # 0.1 s steps: 590 in a minute less a 1 s evaluation; 480 less the probed 1 + 10 s and the probe's own
    # second, which is not counted as step time (as 0.11 s steps, 1.1 s over the 10 measured, it would plan ~435)
    assert 585 <= guessed <= 595 and 475 <= budget.planned <= 485, (guessed, budget.planned)


def test_a_non_positive_budget_is_refused_and_none_is_no_budget():
    with pytest.raises(ValueError, match="max_minutes must be positive"):
        TimeBudgetHook(0)
    clock = FakeClock()
    trainer, _ = toy_run(clock, epochs=3)
    trainer.hooks = [h if not isinstance(h, TimeBudgetHook) else TimeBudgetHook(None, clock=clock)
                     for h in trainer.hooks]
    trainer.train()
    assert trainer.state.global_step == 30 and trainer.state.max_steps is None


def test_a_budgeted_run_resumes_with_the_time_it_has_left():
    clock = FakeClock()
    first, budget = toy_run(clock, StopAfter(20))
    first.train()
    saved = first.state_dict()
    used, planned = saved["hooks"]["time_budget_hook"]["used"], saved["hooks"]["time_budget_hook"]["planned"]
    assert saved["global_step"] == 20 and planned > 20 and used == pytest.approx(clock.now)
    clock.now += 1000.0  # the pause between the sessions does not count
    second, budget = toy_run(clock)
    second.load_state_dict(saved)
    second.train()
    assert second.state.global_step == second.state.max_steps > 20
    assert 0.9 * 60 <= budget.elapsed() <= 60.0, budget.elapsed()


def test_a_budget_from_the_config_plans_the_checkpointed_run(tiny_train_config, tmp_path):
    cfg = tiny_train_config("trainer.epochs=1000", "trainer.max_minutes=0.25", "trainer.eval_every=1000",
                            "eval.plots=false")
    metrics = train(cfg, tmp_path)
    assert "AP" in metrics and (tmp_path / "metrics.json").is_file() and (tmp_path / "best.pt").is_file()
    state = load_checkpoint(tmp_path / "last.pt")
    planned = state["hooks"]["budget"]["planned"]
    assert state["global_step"] == planned == state["max_steps"]
    assert 1 <= planned < 1000 * 3  # (how many fit depends on the machine: wiring only, no timing)
    assert state["hooks"]["schedule"]["lr_lambdas"][0]["total_steps"] == planned


def test_a_budget_on_a_small_dataset_plans_many_epochs_and_warms_up_over_steps():
    # trainer.epochs (5) is only the length before a plan: a minute of 10-step epochs is 20 of them
    clock = FakeClock()
    trainer, budget = toy_run(clock, epochs=5, steps_per_epoch=10)
    schedule = trainer.hooks[0].scheduler.lr_lambdas[0]
    schedule.warmup_steps, schedule.max_warmup_fraction = 125, 0.05
    assert schedule.warmup == 2  # 5% of the 50 steps first configured
    trainer.train()
    assert trainer.state.epochs >= 18 and trainer.state.global_step == budget.planned >= 180
    assert schedule.warmup == round(0.05 * budget.planned)  # laid out again for the planned run
