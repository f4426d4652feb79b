"""ProgressHook's training totals: images, seconds of training steps and epochs done, kept across a resume."""

from types import SimpleNamespace

from detkit.engine.hooks import ProgressHook


def run_epoch(hook: ProgressHook, trainer, steps: int) -> None:
    hook.before_epoch(trainer)
    for _ in range(steps):
        hook.after_step(trainer)
    hook.after_epoch(trainer)


def test_totals_count_a_partial_last_epoch_and_survive_a_resume():
    state = SimpleNamespace(epoch=0, epochs=2, steps_per_epoch=4, step_in_epoch=0, batch_size=8,
                            losses={"loss": 1.0})
    trainer = SimpleNamespace(state=state, lr=0.1)
    hook = ProgressHook(log=lambda _: None)
    run_epoch(hook, trainer, 4)
    saved = hook.state_dict()
    assert saved["images"] == 32 and saved["epochs"] == 1.0 and saved["seconds"] > 0

    resumed = ProgressHook(log=lambda _: None)
    resumed.load_state_dict(saved)
    state.epoch = 1
    run_epoch(resumed, trainer, 2)  # a time budget ended the run halfway through its second epoch
    totals = resumed.state_dict()
    assert totals["images"] == 48 and totals["epochs"] == 1.5 and totals["seconds"] > saved["seconds"]

    old = ProgressHook(log=lambda _: None)
    old.load_state_dict({})  # a checkpoint written before the totals
    assert old.state_dict() == {"images": 0, "seconds": 0.0, "epochs": 0.0}
