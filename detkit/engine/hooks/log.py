"""Logging hooks: progress, TensorBoard scalars, training plots."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from detkit.engine.hooks.base import Hook
from detkit.evaluation.plots import FILES, plot_training_curves, write_evaluation_plots


class ProgressHook(Hook):
    """A progress bar (on a terminal) with loss, lr and img/s; one summary line per epoch everywhere.

    Keeps the run's training totals in its checkpoint entry, over its epochs (a budget's last, partial one
    included; resumed sessions add theirs): ``images`` trained on (all processes), ``seconds`` spent in the
    epochs' steps (data loading included, the evaluations and checkpoints between epochs not) and ``epochs``
    done (optimizer steps / steps per epoch).
    """

    priority = 40
    main_process_only = True

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.bar = None
        self.totals = {"images": 0, "seconds": 0.0, "epochs": 0.0}

    def before_epoch(self, trainer) -> None:
        self.bar = tqdm(total=trainer.state.steps_per_epoch, initial=trainer.state.step_in_epoch,
                        desc=f"epoch {trainer.state.epoch + 1}/{trainer.state.epochs}", disable=not sys.stderr.isatty(),
                        leave=False, dynamic_ncols=True)
        self.epoch_start, self.epoch_images, self.loss_sum, self.steps = time.perf_counter(), 0, {}, 0

    def after_step(self, trainer) -> None:
        self.epoch_images += trainer.state.batch_size
        self.steps += 1
        for k, v in trainer.state.losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v
        rate = self.epoch_images / max(time.perf_counter() - self.epoch_start, 1e-9)
        self.bar.set_postfix(loss=f"{trainer.state.losses['loss']:.3f}", lr=f"{trainer.lr:.2e}", img_s=f"{rate:.0f}")
        self.bar.update(1)

    def after_epoch(self, trainer) -> None:
        self.bar.close()
        elapsed = time.perf_counter() - self.epoch_start
        means = " ".join(f"{k}={v / max(self.steps, 1):.4f}" for k, v in self.loss_sum.items())
        self.log(f"epoch {trainer.state.epoch + 1}/{trainer.state.epochs}: {means} lr={trainer.lr:.2e} "
                 f"{self.epoch_images / max(elapsed, 1e-9):.1f} img/s {elapsed:.0f}s")
        self.totals["images"] += self.epoch_images
        self.totals["seconds"] += elapsed
        self.totals["epochs"] += self.steps / max(trainer.state.steps_per_epoch, 1)

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals.update(state)  # (a checkpoint from before the totals holds {})


class TensorBoardHook(Hook):
    """Scalars under ``log_dir``: losses and lr every ``every`` steps, metrics after each evaluation."""

    priority = 44
    main_process_only = True

    def __init__(self, log_dir: str | Path, every: int = 20) -> None:
        self.log_dir, self.every, self.writer = Path(log_dir), every, None

    def before_train(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when logging

        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.state.global_step)

    def after_step(self, trainer) -> None:
        if trainer.state.global_step % self.every == 0:
            for k, v in trainer.state.losses.items():
                self.writer.add_scalar(f"train/{k}", v, trainer.state.global_step)
            self.writer.add_scalar("train/lr", trainer.lr, trainer.state.global_step)

    def after_epoch(self, trainer) -> None:
        metrics = trainer.state.metrics
        if metrics.get("epoch") == trainer.state.epoch + 1:
            for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "mAP"):
                if k in metrics:  # COCO's statistics, or VOC's mAP (and AP50)
                    self.writer.add_scalar(f"val/{k}", metrics[k], trainer.state.global_step)
        self.writer.flush()

    def after_train(self, trainer) -> None:
        self.writer.close()


class PlotHook(Hook):
    """Collects per-epoch means of the logged losses, the lr and each evaluation's numeric metrics; after the
    last epoch writes ``curves.png`` and, from the final evaluation (``state.metrics``), the evaluation plots
    into ``out_dir`` (unless ``enabled`` is False). Runs before :class:`CheckpointHook`, so a checkpoint holds the
    current epoch's sums."""

    priority = 42
    main_process_only = True

    def __init__(self, out_dir: str | Path, class_names: list[str], enabled: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.out_dir, self.class_names, self.enabled, self.log = Path(out_dir), list(class_names), enabled, log
        self.history: list[dict] = []
        self.loss_sum: dict[str, float] = {}
        self.steps = 0

    def after_step(self, trainer) -> None:
        self.steps += 1
        for k, v in trainer.state.losses.items():
            self.loss_sum[k] = self.loss_sum.get(k, 0.0) + v

    def after_epoch(self, trainer) -> None:
        row = {"epoch": trainer.state.epoch + 1, "lr": trainer.lr}
        row.update({k: v / max(self.steps, 1) for k, v in self.loss_sum.items()})
        if trainer.state.metrics.get("epoch") == trainer.state.epoch + 1:
            metrics = trainer.state.metrics
            row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"})
        self.history.append(row)
        self.loss_sum, self.steps = {}, 0

    def after_train(self, trainer) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        written = [plot_training_curves(self.history, self.out_dir / FILES["curves"])]
        if trainer.state.metrics:
            written += write_evaluation_plots(trainer.state.metrics, self.out_dir, self.class_names)
        self.log(f"plots: {', '.join(p.name for p in written)} ({time.perf_counter() - start:.1f}s)")

    def state_dict(self) -> dict:
        return {"history": self.history, "loss_sum": self.loss_sum, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.loss_sum, self.steps = list(state["history"]), dict(state["loss_sum"]), state["steps"]
