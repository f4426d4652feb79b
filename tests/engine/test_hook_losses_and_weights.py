import pytest
import torch

from detkit.app.train import train
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import Hook


class PullWeightsToZero(Hook):
    """An extra loss term: the squared norm of every weight, times a large factor."""

    def __init__(self) -> None:
        self.seen = []

    def extra_losses(self, trainer, images, targets):
        self.seen.append(images.shape[0])
        return {"loss_pull": 10.0 * sum((p ** 2).sum() for p in trainer.model.parameters())}


def test_a_hooks_extra_loss_is_logged_and_trained_on(tiny_train_config, tmp_path):
    plain = tiny_train_config("trainer.epochs=1", "trainer.ema.enabled=false")
    train(plain, tmp_path / "plain")
    pull = PullWeightsToZero()
    train(plain, tmp_path / "pull", extra_hooks=[pull])
    assert pull.seen and all(n == plain.data.batch_size for n in pull.seen)

    def norm(run):
        weights = load_checkpoint(tmp_path / run / "last.pt")["model"]
        return sum(float((w.float() ** 2).sum()) for k, w in weights.items() if k.endswith("weight"))

    assert norm("pull") < 0.9 * norm("plain")


def test_weights_start_a_run_from_a_checkpoint(tiny_train_config, tmp_path):
    first = tiny_train_config("trainer.epochs=1", "trainer.ema.enabled=false", "optim.lr=0")
    train(first, tmp_path / "a")
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    # lr 0: the run keeps exactly the weights it started from (BN statistics aside)
    train(tiny_train_config("trainer.epochs=1", "trainer.ema.enabled=false", "optim.lr=0",
                            f"weights={tmp_path / 'a' / 'last.pt'}", "seed=5"), tmp_path / "b")
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    params = [k for k in a if k.endswith("weight") and "bn" not in k and a[k].dim() > 1]
    assert params and all(torch.equal(a[k], b[k]) for k in params)


def test_weights_of_another_architecture_are_refused_by_name(tiny_train_config, tmp_path):
    train(tiny_train_config("trainer.epochs=1"), tmp_path / "a")
    other = tiny_train_config("trainer.epochs=1", "model.backbone.width=12", f"weights={tmp_path / 'a' / 'last.pt'}")
    with pytest.raises(ValueError, match="do not fit model"):
        train(other, tmp_path / "b")
