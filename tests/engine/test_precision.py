import pytest
import torch

from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.launch import train
from detkit.engine.trainer import Hook, Trainer


class RecordLosses(Hook):
    def __init__(self) -> None:
        self.dtypes, self.losses = set(), []

    def after_backward(self, trainer) -> None:
        self.dtypes |= {p.grad.dtype for p in trainer.model.parameters() if p.grad is not None}

    def after_step(self, trainer) -> None:
        self.losses.append(trainer.losses["loss"])


def test_bf16_autocast_trains_float32_weights_and_stays_close_to_fp32(tiny_train_config, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        record = RecordLosses()
        train(tiny_train_config(f"trainer.precision={precision}", "trainer.eval_every=9"), tmp_path / precision,
              extra_hooks=[record])
        runs[precision] = record
        weights = load_checkpoint(tmp_path / precision / "last.pt")["model"]
        assert all(t.dtype in (torch.float32, torch.int64) for t in weights.values()), precision
        assert record.dtypes == {torch.float32}
    fp32, bf16 = runs["fp32"].losses, runs["bf16"].losses
    # Same data and init: the first loss differs only by bf16 rounding of the forward pass.
    assert bf16[0] != fp32[0] and abs(bf16[0] - fp32[0]) < 0.02 * fp32[0]


def test_unknown_precision_is_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto"):
        Trainer(model, torch.optim.SGD(model.parameters(), 0.1), None, None, 1, precision="fp16")


def test_auto_precision_is_bf16_exactly_where_the_device_computes_it_natively(monkeypatch):
    import detkit.engine.trainer as trainer_module

    model = torch.nn.Linear(2, 2)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(trainer_module, "native_bf16", lambda device, native=native: native)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), 0.1), None, None, 1, precision="auto")
        assert trainer.precision == expected
