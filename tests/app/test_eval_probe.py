"""make_eval_probe (detkit/app/evaluate.py): the time budget's first estimate of an evaluation, from the loading and
prediction time of a few validation images, scaled to the whole split; and train() hands it to the budget."""

import functools

import pytest
import torch

from detkit.app import evaluate
from detkit.app.evaluate import make_eval_probe
from detkit.engine.hooks import TimeBudgetHook


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostlyModel(torch.nn.Module):
    """Eval forward that costs ``seconds`` of the fake clock per image; no detections."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, images):
        self.clock.now += self.seconds * len(images)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in images]


class CostlyLoader:
    """One batch of ``size`` images whose loading costs ``seconds`` of the fake clock per image."""

    def __init__(self, clock: Clock, size: int, seconds: float) -> None:
        self.clock, self.size, self.seconds = clock, size, seconds

    def __iter__(self):
        self.clock.now += self.seconds * self.size
        targets = [{"image_id": i, "ratio": 1.0, "pad": (0, 0), "orig_size": (32, 32)} for i in range(self.size)]
        yield torch.rand(self.size, 3, 32, 32), targets


def test_the_probe_scales_loading_and_prediction_per_image_to_the_split(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(evaluate.time, "perf_counter", clock)
    model = CostlyModel(clock, seconds=0.25).train()
    probe = make_eval_probe(CostlyLoader(clock, size=32, seconds=0.01), num_images=500, device="cpu")
    assert probe(model) == pytest.approx(500 * (0.25 + 0.01))
    assert model.training  # predict restores the mode
    few = make_eval_probe(CostlyLoader(clock, size=3, seconds=0.0), num_images=10, device="cpu")
    assert few(model) == pytest.approx(10 * 0.25)  # a first batch smaller than the sample
    assert make_eval_probe([], num_images=10, device="cpu")(model) == 0.0


def test_training_hands_the_probe_to_the_time_budget(tiny_builtin, tiny_overrides, tmp_path, monkeypatch):
    from detkit.app.train import train
    from tests.conftest import compose_config

    seen = []
    original = TimeBudgetHook.__init__

    @functools.wraps(original)  # the hooks' builder passes what the constructor's signature names
    def spy(self, *args, eval_probe=None, **kwargs):
        seen.append(eval_probe)
        original(self, *args, eval_probe=eval_probe, **kwargs)

    monkeypatch.setattr(TimeBudgetHook, "__init__", spy)
    train(compose_config("train", [*tiny_overrides, "trainer.epochs=1"]), tmp_path / "run")
    assert len(seen) == 1 and callable(seen[0]) and seen[0].__qualname__.startswith("make_eval_probe")
