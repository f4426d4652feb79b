"""Periodic evaluation during training."""

from __future__ import annotations

import time
from collections.abc import Callable

from detkit.engine.hooks.base import Hook


class EvalHook(Hook):
    """Evaluate ``state.eval_model`` every ``every`` epochs and after the last; sets ``state.metrics`` and
    ``state.is_best``.

    Args:
        evaluate: callable(model) → metrics dict with at least ``key``; it writes its own outputs.
        key: the metric that decides the best checkpoint (higher is better).
    """

    priority = 41
    main_process_only = True

    def __init__(self, evaluate: Callable, every: int = 1, key: str = "AP",
                 log: Callable[[str], None] = print) -> None:
        self.evaluate, self.every, self.key, self.log = evaluate, every, key, log
        self.best = float("-inf")
        self.history: list[dict] = []

    def after_epoch(self, trainer) -> None:
        trainer.state.is_best = False
        done = trainer.state.epoch + 1
        if done % self.every and done != trainer.state.epochs:
            return
        start = time.perf_counter()
        metrics = self.evaluate(trainer.state.eval_model)
        metrics["epoch"] = done
        trainer.state.metrics = metrics
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if metrics[self.key] > self.best:
            self.best, trainer.state.is_best = metrics[self.key], True
        ap50 = f" AP50={metrics['AP50']:.4f}" if "AP50" in metrics and self.key != "AP50" else ""
        self.log(f"eval after epoch {done}: {self.key}={metrics[self.key]:.4f}{ap50} "
                 f"({time.perf_counter() - start:.1f}s)")

    def state_dict(self) -> dict:
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.history = state["best"], list(state["history"])


