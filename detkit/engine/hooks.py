"""Standard trainer hooks: progress, TensorBoard, periodic evaluation, checkpoints, training plots."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.trainer import Hook, Trainer
from detkit.evaluation.plots import FILES, plot_training_curves, write_evaluation_plots


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ProgressHook(Hook):
    """A progress bar (on a terminal) with loss, lr and img/s; one summary line per epoch everywhere."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.bar = None

    def before_epoch(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.steps_per_epoch, initial=trainer.step_in_epoch,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}", disable=not sys.stderr.isatty(),
                        leave=False, dynamic_ncols=True)
        self.epoch_start, self.epoch_images, self.loss_sum, self.steps = time.perf_counter(), 0, {}, 0

    def after_step(self, trainer: Trainer) -> None:
        self.epoch_images += trainer.batch_size
        self.steps += 1
        for k, v in trainer.losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v
        rate = self.epoch_images / max(time.perf_counter() - self.epoch_start, 1e-9)
        self.bar.set_postfix(loss=f"{trainer.losses['loss']:.3f}", lr=f"{trainer.lr:.2e}", img_s=f"{rate:.0f}")
        self.bar.update(1)

    def after_epoch(self, trainer: Trainer) -> None:
        self.bar.close()
        elapsed = time.perf_counter() - self.epoch_start
        means = " ".join(f"{k}={v / max(self.steps, 1):.4f}" for k, v in self.loss_sum.items())
        self.log(f"epoch {trainer.epoch + 1}/{trainer.epochs}: {means} lr={trainer.lr:.2e} "
                 f"{self.epoch_images / max(elapsed, 1e-9):.1f} img/s {elapsed:.0f}s")


class TensorBoardHook(Hook):
    """Scalars under ``log_dir``: losses and lr every ``every`` steps, metrics after each evaluation."""

    def __init__(self, log_dir: str | Path, every: int = 20) -> None:
        self.log_dir, self.every, self.writer = Path(log_dir), every, None

    def before_train(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when logging

        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.global_step)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.global_step % self.every == 0:
            for k, v in trainer.losses.items():
                self.writer.add_scalar(f"train/{k}", v, trainer.global_step)
            self.writer.add_scalar("train/lr", trainer.lr, trainer.global_step)

    def after_epoch(self, trainer: Trainer) -> None:
        metrics = trainer.metrics
        if metrics.get("epoch") == trainer.epoch + 1:
            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP"):
                if k in metrics:  # COCO's statistics, or VOC's mAP (and AP50)
                    self.writer.add_scalar(f"val/{k}", metrics[k], trainer.global_step)
        self.writer.flush()

    def after_train(self, trainer: Trainer) -> None:
        self.writer.close()


class EvalHook(Hook):
    """Evaluate every ``every`` epochs and after the last; set ``trainer.metrics`` and ``trainer.is_best``.

    Args:
        evaluate: callable(model) → metrics dict with at least ``key``; it writes its own outputs.
        key: the metric that decides the best checkpoint (higher is better).
    """

    def __init__(self, evaluate: Callable, every: int = 1, key: str = "AP",
                 log: Callable[[str], None] = print) -> None:
        self.evaluate, self.every, self.key, self.log = evaluate, every, key, log
        self.best = float("-inf")
        self.history: list[dict] = []

    def after_epoch(self, trainer: Trainer) -> None:
        trainer.is_best = False
        done = trainer.epoch + 1
        if done % self.every and done != trainer.epochs:
            return
        start = time.perf_counter()
        metrics = self.evaluate(trainer.eval_model)
        metrics["epoch"] = done
        trainer.metrics = metrics
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if metrics[self.key] > self.best:
            self.best, trainer.is_best = metrics[self.key], True
        ap50 = f" AP50={metrics['AP50']:.4f}" if "AP50" in metrics and self.key != "AP50" else ""
        self.log(f"eval after epoch {done}: {self.key}={metrics[self.key]:.4f}{ap50} "
                 f"({time.perf_counter() - start:.1f}s)")

    def state_dict(self) -> dict:
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.history = state["best"], list(state["history"])


class CheckpointHook(Hook):
    """``last.pt`` after every epoch (and every ``every_steps`` steps if set), ``best.pt`` when the
    evaluation improves. ``extra`` (config, class names, ...) is stored in every checkpoint."""

    def __init__(self, out_dir: str | Path, extra: dict | None = None, every_steps: int = 0) -> None:
        self.out_dir, self.extra, self.every_steps = Path(out_dir), dict(extra or {}), every_steps

    def _state(self, trainer: Trainer) -> dict:
        # "weights" are what evaluation and deployment use (the EMA when there is one).
        return {**trainer.state_dict(), "weights": trainer.eval_model.state_dict(), **self.extra}

    def after_step(self, trainer: Trainer) -> None:
        if self.every_steps and trainer.global_step % self.every_steps == 0:
            save_checkpoint(self._state(trainer), self.out_dir / "last.pt")

    def after_epoch(self, trainer: Trainer) -> None:
        state = self._state(trainer)
        save_checkpoint(state, self.out_dir / "last.pt")
        if trainer.is_best:
            save_checkpoint(state, self.out_dir / "best.pt")


class PlotHook(Hook):
    """Collects per-epoch means of the logged losses, the lr and each evaluation's numeric metrics; after the
    last epoch writes ``curves.png`` and, from the final evaluation (``trainer.metrics``), the evaluation plots
    into ``out_dir``. Place it before :class:`CheckpointHook` so a checkpoint holds the current epoch's sums."""

    def __init__(self, out_dir: str | Path, class_names: list[str], log: Callable[[str], None] = print) -> None:
        self.out_dir, self.class_names, self.log = Path(out_dir), list(class_names), log
        self.history: list[dict] = []
        self.loss_sum: dict[str, float] = {}
        self.steps = 0

    def after_step(self, trainer: Trainer) -> None:
        self.steps += 1
        for k, v in trainer.losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v

    def after_epoch(self, trainer: Trainer) -> None:
        row = {"epoch": trainer.epoch + 1, "lr": trainer.lr}
        row.update({k: v / max(self.steps, 1) for k, v in self.loss_sum.items()})
        if trainer.metrics.get("epoch") == trainer.epoch + 1:
            row.update({k: v for k, v in trainer.metrics.items() if isinstance(v, (int, float)) and k != "epoch"})
        self.history.append(row)
        self.loss_sum, self.steps = {}, 0

    def after_train(self, trainer: Trainer) -> None:
        start = time.perf_counter()
        written = [plot_training_curves(self.history, self.out_dir / FILES["curves"])]
        if trainer.metrics:
            written += write_evaluation_plots(trainer.metrics, self.out_dir, self.class_names)
        self.log(f"plots: {', '.join(p.name for p in written)} ({time.perf_counter() - start:.1f}s)")

    def state_dict(self) -> dict:
        return {"history": self.history, "loss_sum": self.loss_sum, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.loss_sum, self.steps = list(state["history"]), dict(state["loss_sum"]), state["steps"]
