import time

import pytest
import torch

from detkit.app.train import train
from detkit.engine.budget import TimeBudgetHook
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.optim import build_scheduler
from detkit.engine.trainer import Hook, Trainer


def test_a_time_budget_ends_the_run_inside_it_with_final_evaluation_and_checkpoints(tiny_train_config, tmp_path):
    budget_minutes = 0.25
    cfg = tiny_train_config("trainer.epochs=1000", f"trainer.max_minutes={budget_minutes}", "trainer.eval_every=1000",
                            "eval.plots=false")
    start = time.perf_counter()
    metrics = train(cfg, tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed <= 1.03 * 60 * budget_minutes, elapsed
    assert elapsed >= 0.5 * 60 * budget_minutes, elapsed  # planned to use the budget, not stopped at once
    assert "AP" in metrics and (tmp_path / "metrics.json").is_file()
    state = load_checkpoint(tmp_path / "last.pt")
    assert (tmp_path / "best.pt").is_file()
    planned = state["hooks"]["TimeBudgetHook"]["planned"]
    assert state["global_step"] == planned == state["max_steps"]
    assert 3 < planned < 1000 * 3  # tiny set: 3 steps per epoch
    # the lr schedule was laid out for the planned run: its last step is at the cosine's floor
    schedule = state["scheduler"]["lr_lambdas"][0]
    assert schedule["total_steps"] == planned


def _trainer(epochs: int = 10, steps_per_epoch: int = 4) -> Trainer:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), 1.0)
    loader = torch.utils.data.DataLoader(list(range(steps_per_epoch * 2)), batch_size=2)
    return Trainer(model, optimizer, build_scheduler(optimizer, epochs * steps_per_epoch, 0, final_factor=0.0),
                   loader, epochs)


def test_plan_moves_the_end_of_the_schedule_and_the_epochs():
    trainer = _trainer()
    assert trainer.total_steps == 40
    trainer.plan(14)
    assert trainer.total_steps == 14 and trainer.epochs == 4  # 3.5 epochs: the last one partial
    for _ in range(14):
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert trainer.lr == pytest.approx(0.0, abs=1e-9)  # cosine reached its floor at the planned end


def test_budget_planning_counts_the_evaluations_on_the_way():
    hook = TimeBudgetHook(max_minutes=1.0, started=time.perf_counter(), eval_images=0, eval_every=1,
                          final_seconds=0.0, fixed_eval_seconds=5.0)
    trainer = _trainer(epochs=100, steps_per_epoch=10)
    trainer.batch_size = 2
    every_epoch = hook._steps_that_fit(trainer, seconds_per_step=0.1)
    hook.eval_every = 1000
    end_only = hook._steps_that_fit(trainer, seconds_per_step=0.1)
    # 600 steps of 0.1 s fit in a minute, less one 5 s evaluation at the end; with one after every 10-step
    # epoch, an epoch costs 6 s: ten of them
    assert 540 <= end_only <= 550 and 95 <= every_epoch <= 100, (end_only, every_epoch)


def test_a_non_positive_budget_is_refused():
    with pytest.raises(ValueError, match="max_minutes must be positive"):
        TimeBudgetHook(0)


class StopAfter(Hook):
    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self, trainer) -> None:
        trainer.stop_requested = trainer.global_step == self.n


def test_a_budgeted_run_resumes_with_the_time_it_has_left(tiny_train_config, tmp_path):
    cfg = tiny_train_config("trainer.epochs=1000", "trainer.max_minutes=0.2", "trainer.eval_every=1000",
                            "eval.plots=false", "trainer.checkpoint_every_steps=1")
    train(cfg, tmp_path, extra_hooks=[StopAfter(20)])
    cut = load_checkpoint(tmp_path / "last.pt")
    used, planned = cut["hooks"]["TimeBudgetHook"]["used"], cut["hooks"]["TimeBudgetHook"]["planned"]
    assert cut["global_step"] == 20 and planned > 20 and used > 0
    start = time.perf_counter()
    train(tiny_train_config("trainer.epochs=1000", "trainer.max_minutes=0.2", "trainer.eval_every=1000",
                            "eval.plots=false", f"resume={tmp_path / 'last.pt'}"), tmp_path)
    second = time.perf_counter() - start
    done = load_checkpoint(tmp_path / "last.pt")
    total = done["hooks"]["TimeBudgetHook"]["used"]
    assert done["global_step"] == done["max_steps"] > 20
    assert second < 12.0 - used + 1.0 and total <= 1.03 * 12.0, (used, second, total)
