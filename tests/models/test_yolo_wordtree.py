"""YOLOv3/YOLOv2 with ``wordtree``: one walked-down node per box at inference, config checks, and a joint
detection + classification epoch through the real trainer on the tiny built-in data."""

import pytest
import torch

from detkit.app.train import train
from detkit.errors import ConfigError
from detkit.models.backbones.darknet19 import Darknet19
from detkit.models.detectors.yolo import YOLOv3
from tests.conftest import compose_config

PARENTS = [10, 11, 11, 11, 11, 11, 10, 11, 10, 10, -1, -1]


def tiny_yolov2(num_classes: int = 12, **kwargs) -> YOLOv3:
    torch.manual_seed(0)
    backbone = Darknet19(depths=[1, 1, 1, 1, 1, 1], width=8, num_outputs=1)
    return YOLOv3(num_classes, backbone, [[[16, 16], [32, 32]]], level_weights=[1.0], head_channels=[32], **kwargs)


def test_each_prediction_scores_only_its_walked_down_node():
    model = tiny_yolov2(wordtree={"parents": PARENTS}, wordtree_thresh=0.5).eval()
    with torch.no_grad():
        bias = model.heads[0][-1].bias.view(2, 17)
        bias[0, 5 + 11] = bias[0, 5 + 4] = 8.0  # anchor 0: sure of "no_loops" and of "4" in it: the leaf "4"
        bias[1, 5:] = 0.0  # anchor 1: a root, whose children tie far below the threshold
        images = torch.rand(1, 3, 64, 64)
        outputs = model.raw_outputs(images)
        _, scores = model.dense_predictions(images)
    raw = outputs[0].reshape(1, -1, 17)
    node, prob = model.wordtree.walk_down(raw[..., 5:], 0.5)
    assert ((scores > 0).sum(-1) == 1).all()
    torch.testing.assert_close(scores.argmax(-1), node)
    torch.testing.assert_close(scores.amax(-1), raw[..., 4].sigmoid() * prob)
    anchor = torch.arange(raw.shape[1]) // (outputs[0].shape[2] * outputs[0].shape[3])
    assert (node[0, anchor == 0] == 4).all() and (node[0, anchor == 1] >= 10).all()
    detections = model(images)[0]
    assert set(detections["labels"].tolist()) <= set(node[0].tolist())


def test_wordtree_config_errors():
    with pytest.raises(ConfigError, match="12 entries for 10 classes"):
        tiny_yolov2(10, wordtree={"parents": PARENTS})
    with pytest.raises(ConfigError, match="replaces class_softmax"):
        tiny_yolov2(wordtree={"parents": PARENTS}, class_softmax=True)
    with pytest.raises(ConfigError, match="cycle"):
        tiny_yolov2(wordtree={"parents": [1, 0, *PARENTS[2:]]})


@pytest.mark.parametrize("model", [["model=yolov2_wordtree_cpu", "model.backbone.depths=[1,1,1,1,1,1]"],
                                   ["model=yolov3_compact_wordtree", "model.backbone.depths=[1,1,1,1]"]])
def test_a_joint_training_epoch_runs_through_the_trainer(tiny_overrides, tmp_path, model):
    cfg = compose_config("train", [*tiny_overrides, "data=builtin_wordtree", *model, "trainer.epochs=1",
                                   f"data.generate.out_dir={tmp_path / 'joint'}"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics  # evaluated on val's 12 tree classes
    assert (tmp_path / "joint" / "classification.json").is_file()
