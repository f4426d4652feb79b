import torch

from detkit.app.train import train
from detkit.engine.checkpoint import load_checkpoint


def test_a_finished_run_resumed_with_more_epochs_continues_from_where_it_ended(tiny_train_config, tmp_path):
    train(tiny_train_config("trainer.epochs=1", "trainer.eval_every=9"), tmp_path)
    first = load_checkpoint(tmp_path / "last.pt")
    steps = first["global_step"]
    assert steps > 0
    train(tiny_train_config("trainer.epochs=2", "trainer.eval_every=9", f"resume={tmp_path / 'last.pt'}"), tmp_path)
    extended = load_checkpoint(tmp_path / "last.pt")
    assert extended["global_step"] == 2 * steps and extended["epoch"] == 1
    assert any(not torch.equal(first["model"][k], v) for k, v in extended["model"].items())


def test_deterministic_runs_give_identical_weights(tiny_train_config, tmp_path):
    try:
        for run in ("a", "b"):
            train(tiny_train_config("trainer.deterministic=true", "trainer.epochs=1", "trainer.eval_every=9"),
                  tmp_path / run)
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("a", "b"))
    for key in ("model", "weights"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
