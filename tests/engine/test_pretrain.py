"""tools/pretrain.py's engine: a backbone trained on object crops, saved, and loaded by a detection run."""

import pytest
import torch

from detkit.app.build import build_model
from detkit.app.pretrain import load_backbone_weights, pretrain_backbone
from detkit.app.train import train
from tests.conftest import compose_config


@pytest.fixture
def pretrained(tiny_builtin, tmp_path):
    cfg = compose_config("pretrain", [
        f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24", "data.builtin.num_val=8",
        "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1",
        "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]", "pretrain.size=48", "pretrain.epochs=12",
        "pretrain.batch_size=16", "pretrain.lr=0.005", "pretrain.threads=1",
    ])
    return cfg, pretrain_backbone(cfg, tmp_path / "pre")


def test_pretraining_learns_and_a_detection_run_starts_from_it(pretrained, tiny_train_config, tmp_path):
    cfg, summary = pretrained
    history = summary["history"]
    assert len(history) == 12 and history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["train_accuracy"] > 0.3  # 11 classes: chance is 0.09
    state = torch.load(summary["backbone"], weights_only=True)
    assert state["model_target"].endswith("YOLOv3") and len(state["class_names"]) == 10

    # optim.lr=0 and one epoch: the run's weights are the file's (BatchNorm statistics aside)
    run = tiny_train_config(f"backbone_weights={summary['backbone']}", "optim.lr=0", "trainer.epochs=1",
                            "trainer.ema.enabled=false")
    train(run, tmp_path / "run")
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    convs = [k for k, v in state["backbone"].items() if v.ndim == 4]  # the conv kernels
    assert convs and all(torch.equal(trained[f"backbone.{k}"], state["backbone"][k]) for k in convs)


def test_a_backbone_file_for_another_model_is_a_clear_error(pretrained, tmp_path):
    _, summary = pretrained
    other = build_model(compose_config("train", ["model=yolov3_compact", "model.backbone.width=16"]).model, 10)
    with pytest.raises(ValueError, match=r"backbone\.pt does not fit this YOLOv3's backbone .* of another shape"):
        load_backbone_weights(other, summary["backbone"])
    with pytest.raises(FileNotFoundError, match="backbone_weights: no such file"):
        load_backbone_weights(other, tmp_path / "nope.pt")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a backbone file written by tools/pretrain.py"):
        load_backbone_weights(other, tmp_path / "ckpt.pt")


@pytest.mark.parametrize("name", ["ssdlite", "fpn_rcnn_cpu", "yolov1_cpu"])
def test_backbones_of_other_families_pretrain_and_load_back(name, tiny_builtin, tmp_path):
    overrides = [f"model={name}", f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24",
                 "data.builtin.num_val=8", "data.builtin.min_size=96", "data.builtin.max_size=128",
                 "data.builtin.workers=1", "pretrain.size=64", "pretrain.epochs=1", "pretrain.batch_size=16",
                 "pretrain.threads=1"]
    summary = pretrain_backbone(compose_config("pretrain", overrides), tmp_path)
    detector = build_model(compose_config("train", [f"model={name}"]).model, 10)
    load_backbone_weights(detector, summary["backbone"])
    saved = torch.load(summary["backbone"], weights_only=True)["backbone"]
    assert all(torch.equal(v, saved[k]) for k, v in detector.backbone.state_dict().items())
