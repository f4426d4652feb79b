import pytest
import torch

from detkit.app.train import out_of_memory_hint, train
from detkit.engine.amp import AMPTrainer
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import Hook


class RecordLosses(Hook):
    def __init__(self) -> None:
        self.dtypes, self.losses = set(), []

    def after_backward(self, trainer) -> None:
        self.dtypes |= {p.grad.dtype for p in trainer.model.parameters() if p.grad is not None}

    def after_step(self, trainer) -> None:
        self.losses.append(trainer.state.losses["loss"])


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
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, auto"):
        AMPTrainer(model, torch.optim.SGD(model.parameters(), 0.1), None, 1, precision="fp8")


def test_auto_precision_is_bf16_exactly_where_the_device_computes_it_natively(monkeypatch):
    import detkit.engine.amp as amp_module

    model = torch.nn.Linear(2, 2)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(amp_module, "native_bf16", lambda device, native=native: native)
        trainer = AMPTrainer(model, torch.optim.SGD(model.parameters(), 0.1), None, 1, precision="auto")
        assert trainer.precision == expected


def test_fp16_scales_the_loss_and_checkpoints_the_scaler(tiny_train_config, tmp_path):
    record = RecordLosses()
    train(tiny_train_config("trainer.precision=fp16", "trainer.eval_every=9", "trainer.epochs=1"), tmp_path,
          extra_hooks=[record])
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["scaler"]["scale"] > 1.0  # dynamic loss scaling was on
    assert record.dtypes == {torch.float32}  # gradients reach the hooks unscaled, in the weights' dtype
    assert all(torch.isfinite(torch.tensor(record.losses)))


def test_the_scaler_hands_hooks_true_gradients():
    model = torch.nn.Linear(3, 1)
    x = torch.ones(4, 3)
    grads = {}

    class Grab(Hook):
        def after_backward(self, trainer):
            grads[trainer.precision] = model.weight.grad.clone()

    for precision in ("fp32", "fp16"):
        with torch.no_grad():
            model.weight.fill_(0.5), model.bias.zero_()
        trainer = AMPTrainer(model, torch.optim.SGD(model.parameters(), 0.0), None, 1, hooks=[Grab()],
                             precision=precision,
                             forward=lambda images, targets: {"loss": model(images).float().sum()})
        if precision == "fp16":  # a scale whose products stay inside float16's range in this tiny case
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        trainer.run_step([(x, [{}] * 4)])
    assert torch.allclose(grads["fp16"], grads["fp32"], rtol=1e-3)


def test_compile_wraps_the_training_forward_only(tiny_train_config, tmp_path):
    train(tiny_train_config("trainer.compile=eager", "trainer.eval_every=9", "trainer.epochs=1",
                            "trainer.precision=fp32"), tmp_path)
    weights = load_checkpoint(tmp_path / "last.pt")["model"]
    assert weights and not any(k.startswith("_orig_mod") for k in weights)  # the plain module was saved


def test_out_of_memory_in_training_says_to_lower_the_batch():
    with pytest.raises(MemoryError, match=r"batch of 4 images of 8x8: lower data.batch_size \(e.g. "
                                          r"data.batch_size=2\) and raise trainer.accumulate \(now 2\)"):
        with out_of_memory_hint(4, 8, accumulate=2, device=torch.device("cpu")):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 99999999999 bytes")


def test_other_runtime_errors_keep_their_own_message():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with out_of_memory_hint(4, 8, accumulate=1, device=torch.device("cpu")):
            raise RuntimeError("shape mismatch")
