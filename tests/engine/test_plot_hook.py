"""PlotHook: per-epoch means of what the trainer logs, kept across a resume, drawn after training."""

from types import SimpleNamespace

import numpy as np

from detkit.engine.hooks import PlotHook


def fake_trainer(**kw) -> SimpleNamespace:
    return SimpleNamespace(lr=0.1, state=SimpleNamespace(epoch=0, losses={}, metrics={}), **kw)


def test_epoch_means_metrics_resume_and_plots(tmp_path):
    hook, trainer = PlotHook(tmp_path, ["a", "b"], log=lambda _: None), fake_trainer()
    for loss in (1.0, 3.0):
        trainer.state.losses = {"loss": loss, "loss_box": loss / 2}
        hook.after_step(trainer)
    hook.after_epoch(trainer)  # no evaluation this epoch
    assert hook.history == [{"epoch": 1, "lr": 0.1, "loss": 2.0, "loss_box": 1.0}]

    # A resumed run continues the same sums: one step before the "crash", one after.
    trainer.state.epoch, trainer.lr = 1, 0.05
    trainer.state.losses = {"loss": 1.0, "loss_box": 0.5}
    hook.after_step(trainer)
    resumed = PlotHook(tmp_path, ["a", "b"], log=lambda _: None)
    resumed.load_state_dict(hook.state_dict())
    trainer.state.losses = {"loss": 0.0, "loss_box": 0.0}
    resumed.after_step(trainer)
    trainer.state.metrics = {"epoch": 2, "mAP": 0.5, "AP50": 0.5, "metric": "voc07",
                             "per_class": {"a": 0.4, "b": 0.6}, "pr_curves": {"a": (np.array([1.0]), np.array([0.5]))},
                       "confusion_matrix": np.zeros((3, 3), int)}
    resumed.after_epoch(trainer)
    assert resumed.history[1] == {"epoch": 2, "lr": 0.05, "loss": 0.5, "loss_box": 0.25, "mAP": 0.5, "AP50": 0.5}

    resumed.after_train(trainer)
    for name in ("curves.png", "pr_curves.png", "ap_per_class.png", "confusion_matrix.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
