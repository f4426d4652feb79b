"""Channel scores for structured pruning on hand-built cases: filter L1, Taylor, APoZ."""

import pytest
import torch
from torch import nn

from detkit.compression.criteria import apoz_scores, group_scores, l1_scores, taylor_scores
from detkit.models.layers import ConvBNAct
from tests.compression.detector_fixtures import TARGETS, one_thread, tiny_yolo  # noqa: F401


def test_l1_is_the_filter_norm_of_the_conv_before_each_batchnorm():
    block = nn.Sequential(ConvBNAct(2, 3, 1), ConvBNAct(3, 2, 3))
    with torch.no_grad():
        block[0][0].weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.5], [-3.0, 3.0]]).view(3, 2, 1, 1))
    scores = l1_scores(block)
    assert set(scores) == {"0.1", "1.1"}
    assert torch.equal(scores["0.1"], torch.tensor([3.0, 0.5, 6.0]))
    assert torch.allclose(scores["1.1"], block[1][0].weight.abs().sum((1, 2, 3)))


def test_apoz_scores_the_fraction_of_positive_outputs():
    block = ConvBNAct(1, 3, 1, act="relu").eval()
    with torch.no_grad():
        block[0].weight.fill_(1.0)
        block[1].bias.copy_(torch.tensor([-100.0, 100.0, 0.0]))  # always zero, always active, sign of input
    images = torch.cat([torch.ones(1, 1, 4, 4), -torch.ones(1, 1, 4, 4)])  # half the inputs negative
    scores = apoz_scores(block, [images])
    torch.testing.assert_close(scores["1"], torch.tensor([0.0, 1.0, 0.5]))
    assert not block.training


class Scaled(nn.Module):
    """1×1 conv → BN → ReLU; the loss is Σ c_k · output_k, so dL/da_k = c_k where a_k > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("c", torch.tensor([1.0, 3.0]))

    def forward(self, images, targets=None):
        out = self.act(self.bn(self.conv(images)))
        return {"loss": (out * self.c[:, None, None]).sum()}


def test_taylor_is_mean_activation_times_gradient_and_leaves_the_model_as_it_was():
    model = Scaled()
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
        model.bn.bias.copy_(torch.tensor([10.0, 10.0]))  # activations > 0: the ReLU passes every gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(3, 1, 2, 2)
    scores = taylor_scores(model, [(images, None)], normalize=False)
    bn_out = nn.functional.batch_norm(images.repeat(1, 2, 1, 1), None, None, training=True) + 10.0
    expected = (bn_out * model.c[:, None, None]).mean((2, 3)).abs().mean(0)
    torch.testing.assert_close(scores["bn"], expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.conv.weight.grad is None
    normalized = taylor_scores(model, [(images, None)])
    torch.testing.assert_close(normalized["bn"].norm(), torch.tensor(1.0))


def test_group_scores_take_the_largest_over_coupled_batchnorms_and_errors_are_named():
    scores = {"a": torch.tensor([1.0, 5.0, 2.0]), "b": torch.tensor([4.0, 0.0])}
    torch.testing.assert_close(group_scores(scores, [("a", [0, 2]), ("b", [0, 1])]), torch.tensor([4.0, 2.0]))
    with pytest.raises(KeyError, match="no scores"):
        group_scores(scores, [("c", [0])])
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        apoz_scores(nn.Conv2d(1, 1, 1), [torch.zeros(1, 1, 2, 2)])


def test_every_criterion_scores_every_batchnorm_of_a_detector():
    model, targets = tiny_yolo(), TARGETS
    names = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    images = torch.rand(2, 3, 64, 64)
    for scores in [l1_scores(model), apoz_scores(model, [images]), taylor_scores(model, [(images, targets)])]:
        assert set(scores) == names
        assert all(s.shape == (dict(model.named_modules())[n].num_features,) for n, s in scores.items())
        assert all(torch.isfinite(s).all() and (s > 0).any() for s in scores.values())


def test_the_criterion_decides_which_channels_the_pruner_removes():
    from detkit.compression.criteria import criterion_scores
    from detkit.compression.graph import channel_groups, example_images
    from detkit.compression.pruning import plan_pruning, prune_model

    model = tiny_yolo()
    groups = channel_groups(model, images=example_images(64))
    group = next(g for g in groups if g.prunable and len(g.batchnorms) == 1 and g.channels >= 8)
    (bn_name, idxs), = group.batchnorms
    modules = dict(model.named_modules())
    conv = modules[group.writers[0]]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
        modules[bn_name].weight[idxs[2]] = 1e-3  # the smallest γ of the model ...
        conv.weight[5] *= 1e-3  # ... and the smallest filter, on another channel
    total = sum(g.channels for g in groups if g.prunable)
    ratio = 1.0 / total  # one channel
    by_gamma = plan_pruning(model, groups, ratio, min_channels=1, scores=criterion_scores(model, "bn_gamma"))
    by_l1 = plan_pruning(model, groups, ratio, min_channels=1, scores=criterion_scores(model, "l1"))
    assert by_gamma == {group.root: [2]} and by_l1 == {group.root: [5]}
    result = prune_model(model, ratio, min_channels=1, scores=criterion_scores(model, "l1"))
    assert result.removed == 1 and conv.out_channels == group.channels - 1
    with pytest.raises(ValueError, match="calibration batches"):
        criterion_scores(model, "taylor")
    with pytest.raises(ValueError, match="criterion must be one of"):
        criterion_scores(model, "gamma")
