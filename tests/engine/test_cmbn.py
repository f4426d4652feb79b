"""CmBN: a window's statistics are the concatenated batch's, its running update is one BatchNorm update on that
batch, its gradients are those of BatchNorm over the window with the earlier mini-batches held fixed, k = 1 is
BatchNorm; the conversion keeps the modules, their keys and what Network Slimming finds; a short run trains."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkit.app.train import train
from detkit.compression.graph import prunable_batchnorms
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks.cmbn import CrossMiniBatchNorm2d, convert_cmbn, restore_batchnorm
from tests.models.test_yolo import tiny_yolo
from tests.models.test_yolo_family import one_thread  # noqa: F401 (autouse: one intra-op thread)


def pair(channels: int = 3, momentum: float | None = 0.1) -> tuple[CrossMiniBatchNorm2d, nn.BatchNorm2d]:
    """A CmBN and a BatchNorm2d with the same random γ, β and running statistics."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    cmbn = CrossMiniBatchNorm2d(channels, momentum=momentum)
    cmbn.load_state_dict(bn.state_dict())
    return cmbn, bn


def chunks() -> list[torch.Tensor]:
    """Three mini-batches of different sizes and statistics, (B_t, 3, 5, 4)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 5, 4, generator=generator) * scale + shift
            for b, scale, shift in [(2, 1.0, 0.0), (3, 2.0, 1.0), (4, 0.5, -2.0)]]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_window_statistics_and_running_update_are_the_concatenated_batchs(momentum):
    cmbn, bn = pair(momentum=momentum)
    xs = chunks()
    cmbn.train().start_window()
    outputs = []
    for t, x in enumerate(xs):
        outputs.append(cmbn(x))
        seen = torch.cat(xs[: t + 1])
        # mini-batch t is normalised with the statistics of mini-batches 0..t together
        expected = F.batch_norm(seen, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)[-x.shape[0]:]
        torch.testing.assert_close(outputs[-1], expected, atol=1e-5, rtol=1e-5)
        var, mean = torch.var_mean(seen, dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(cmbn.window_mean, mean)
        torch.testing.assert_close(cmbn.window_var, var)
    before = (cmbn.running_mean.clone(), cmbn.running_var.clone())
    torch.testing.assert_close((cmbn.running_mean, cmbn.running_var), before)  # nothing until the window ends
    big = torch.cat(xs)
    bn.train()(big)  # one BatchNorm update on the concatenated batch
    cmbn.end_window()
    torch.testing.assert_close(cmbn.running_mean, bn.running_mean)
    torch.testing.assert_close(cmbn.running_var, bn.running_var)
    assert int(cmbn.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    assert cmbn.window_mean is None and cmbn.window_count == 0
    # the last mini-batch's output is the concatenated batch's BatchNorm output
    torch.testing.assert_close(outputs[-1], bn(big)[-xs[-1].shape[0]:], atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_current_mini_batch_share_only():
    cmbn, bn = pair()
    xs = [x.requires_grad_(True) for x in chunks()]
    weights = torch.randn(xs[-1].shape, generator=torch.Generator().manual_seed(2))
    cmbn.train().start_window()
    for x in xs[:-1]:
        cmbn(x)
    (cmbn(xs[-1]) * weights).sum().backward()
    grads = (xs[-1].grad.clone(), cmbn.weight.grad.clone(), cmbn.bias.grad.clone())
    assert xs[0].grad is None  # the earlier mini-batches are constants of this one's statistics

    last = xs[-1].detach().clone().requires_grad_(True)
    seen = torch.cat([*(x.detach() for x in xs[:-1]), last])
    out = F.batch_norm(seen, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)[-last.shape[0]:]
    (out * weights).sum().backward()
    torch.testing.assert_close(grads, (last.grad, bn.weight.grad, bn.bias.grad), atol=1e-5, rtol=1e-5)


def test_a_window_of_one_mini_batch_is_batchnorm():
    cmbn, bn = pair()
    cmbn.train(), bn.train()
    for x in chunks():  # one optimizer step per mini-batch
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        cmbn.start_window()
        out_cmbn = cmbn(a)
        out_bn = bn(b)
        cmbn.end_window()
        torch.testing.assert_close(out_cmbn, out_bn)
        out_cmbn.square().sum().backward()
        out_bn.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(cmbn.state_dict(), bn.state_dict())
    torch.testing.assert_close((cmbn.weight.grad, cmbn.bias.grad), (bn.weight.grad, bn.bias.grad))
    x = chunks()[1]
    torch.testing.assert_close(cmbn.eval()(x), bn.eval()(x))


def test_conversion_keeps_modules_keys_and_network_slimming_batchnorms():
    torch.manual_seed(0)
    model = tiny_yolo().train()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    originals = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    slimmed = {id(m) for m in prunable_batchnorms(model)}

    converted = convert_cmbn(model)
    assert [id(m) for m in converted] == [id(m) for m in originals]  # the same objects, only their class changed
    assert all(isinstance(m, nn.BatchNorm2d) for m in converted)
    assert list(model.state_dict()) == keys
    assert {id(m) for m in prunable_batchnorms(model)} == slimmed  # Network Slimming traces it as before
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), plain.eval()(images))
    restore_batchnorm(model)
    assert all(type(m) is nn.BatchNorm2d for m in originals)
    plain.load_state_dict(model.state_dict())


def test_training_with_cmbn_and_sparsity_runs(tiny_train_config, tmp_path):
    cfg = tiny_train_config("trainer.cmbn=true", "trainer.accumulate=2", "data.batch_size=4", "trainer.epochs=1",
                            "+compress=sparsity", "eval.plots=false", "hooks.tensorboard=null")
    metrics = train(cfg, tmp_path)
    assert "AP" in metrics
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["global_step"] == 3  # 24 images / (4 x 2) per step
    bn_counts = {k: int(v) for k, v in saved["model"].items() if k.endswith("num_batches_tracked")}
    assert bn_counts and set(bn_counts.values()) == {3}  # one running update per optimizer step, not per batch


def test_bf16_autocast_and_channels_last_keep_batchnorms_dtype_and_layout():
    cmbn, _ = pair()
    conv = nn.Conv2d(3, 3, 3, padding=1)
    xs = [x.contiguous(memory_format=torch.channels_last) for x in chunks()]
    with torch.no_grad():
        reference = [cmbn.train()(conv(x)) for x in xs]  # float32
        cmbn.start_window()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = [cmbn(conv(x)) for x in xs]
            plain = F.batch_norm(conv(xs[0]), None, None, cmbn.weight, cmbn.bias, True, 0.0, cmbn.eps)
    assert all(out.dtype == plain.dtype for out in outputs)
    assert all(out.is_contiguous(memory_format=torch.channels_last) for out in outputs)
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
