"""channels_last (trainer.channels_last, on by default) converts a model's 4-D tensors only: darknet YOLOv1's
locally connected head holds 5-D kernels, on which ``Module.to(memory_format=torch.channels_last)`` stops."""

import torch
from torch import nn

from detkit.app.train import train
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.trainer import model_to
from detkit.models.layers import LocallyConnected2d
from tests.conftest import compose_config


def test_model_to_puts_convolutions_in_nhwc_and_leaves_other_tensors_as_they_are():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), LocallyConnected2d(4, 2, 3, (6, 6), padding=1))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model_to(model, "cpu", channels_last=True)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    assert model[2].weight.dim() == 5 and model[2].weight.is_contiguous()
    assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    model_to(model, "cpu", channels_last=False)  # no conversion asked: the layout stays as it is
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_darknet_yolov1_trains_with_channels_last(tiny_builtin, tmp_path):
    cfg = compose_config("train", [
        f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24", "data.builtin.num_val=8",
        "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1", "data.batch_size=8",
        "data.eval_batch_size=8", "model=yolov1_darknet", "model.input_size=128", "model.width=8",
        "model.repeats=[0,0]", "model.local_filters=8", "data.img_size=128", "data.mosaic.prob=0",
        "trainer.epochs=1", "trainer.threads=1", "trainer.channels_last=true", "eval.plots=false"])
    train(cfg, tmp_path / "run")
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert any(v.dim() == 5 for v in weights.values())
