"""``pretrained=``: a local state-dict file or a torchvision weights name (resolved by torchvision, which is
replaced here so that nothing downloads)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from detkit.convert.pretrained import PretrainedError, is_weights_name, load_state_dict
from detkit.models.backbones.resnet import ResNet


def _resnet18_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def _same(backbone: ResNet, state: dict) -> bool:
    return (torch.equal(backbone.stem[0].weight, state["conv1.weight"])
            and torch.equal(backbone.stages[3][1].bn2.running_var, state["layer4.1.bn2.running_var"]))


def test_a_local_file_loads_into_the_backbone(tmp_path):
    state = _resnet18_state()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    assert _same(ResNet(18, pretrained=str(path)), state)
    assert not _same(ResNet(18), state)


def test_a_weights_name_resolves_through_torchvision(monkeypatch):
    state = _resnet18_state(1)
    asked = []

    class FakeWeights:
        def get_state_dict(self, progress=True, check_hash=False):
            return state

    def fake_get_weight(name):
        asked.append(name)
        if name != "ResNet18_Weights.IMAGENET1K_V1":
            raise ValueError(f"no {name}")
        return FakeWeights()

    monkeypatch.setattr(torchvision.models, "get_weight", fake_get_weight)
    assert _same(ResNet(18, pretrained="ResNet18_Weights.IMAGENET1K_V1"), state)
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"]
    with pytest.raises(PretrainedError, match="torchvision has no such weights"):
        load_state_dict("ResNet18_Weights.NOPE")


def test_neither_a_file_nor_a_name_and_a_file_that_is_not_a_state_dict_are_clear_errors(tmp_path):
    assert is_weights_name("VGG16_Weights.IMAGENET1K_FEATURES") and not is_weights_name("runs/r50.pth")
    with pytest.raises(PretrainedError, match="no such file, and not a torchvision weights name"):
        load_state_dict(str(tmp_path / "missing.pth"))
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(PretrainedError, match="not a state dict"):
        load_state_dict(str(path))
