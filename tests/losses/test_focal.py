import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from detkit.losses.focal import sigmoid_focal_loss, softmax_focal_loss


def logits_and_labels(n: int = 64, c: int = 5, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=dtype) * 3, torch.randint(c, (n,), generator=g)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_matches_torchvision(reduction):
    logits, labels = logits_and_labels()
    targets = F.one_hot(labels, 5).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction=reduction)
    assert torch.allclose(ours, tv_sigmoid_focal_loss(logits, targets, 0.25, 2.0, reduction))


def test_sigmoid_focal_alpha_none_and_weights():
    logits, labels = logits_and_labels(seed=1)
    targets = F.one_hot(labels, 5).float()
    unweighted = tv_sigmoid_focal_loss(logits, targets, alpha=-1, gamma=1.5)
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=None, gamma=1.5, reduction="none"), unweighted)
    weight = torch.rand(64, 1, generator=torch.Generator().manual_seed(2))
    ours = sigmoid_focal_loss(logits, targets, alpha=None, gamma=1.5, reduction="sum", weight=weight)
    assert torch.allclose(ours, (unweighted * weight).sum())


def test_sigmoid_focal_gamma_zero_is_bce():
    logits, labels = logits_and_labels(seed=3)
    targets = F.one_hot(labels, 5).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=None, gamma=0.0, reduction="mean")
    assert torch.allclose(ours, F.binary_cross_entropy_with_logits(logits, targets))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_softmax_focal_gamma_zero_is_cross_entropy(reduction):
    logits, labels = logits_and_labels(seed=4)
    ours = softmax_focal_loss(logits, labels, alpha=None, gamma=0.0, reduction=reduction)
    assert torch.allclose(ours, F.cross_entropy(logits, labels, reduction=reduction), atol=1e-6)


def test_softmax_focal_per_class_alpha_is_weighted_cross_entropy_at_gamma_zero():
    logits, labels = logits_and_labels(seed=5)
    alpha = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.25])
    ours = softmax_focal_loss(logits, labels, alpha=alpha, gamma=0.0, reduction="none")
    assert torch.allclose(ours, F.cross_entropy(logits, labels, weight=alpha, reduction="none"), atol=1e-6)
    scalar = softmax_focal_loss(logits, labels, alpha=0.25, gamma=0.0, reduction="sum")
    assert torch.allclose(scalar, 0.25 * F.cross_entropy(logits, labels, reduction="sum"))


def test_softmax_focal_matches_a_plain_formula_and_downweights_easy_samples():
    logits, labels = logits_and_labels(seed=6, dtype=torch.float64)
    gamma = 2.0
    ours = softmax_focal_loss(logits, labels, gamma=gamma, reduction="none")
    for i in range(len(labels)):
        p = torch.softmax(logits[i], 0)[labels[i]].item()
        assert ours[i].item() == pytest.approx(-((1 - p) ** gamma) * math.log(p), rel=1e-9, abs=1e-12)
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert (ours <= ce + 1e-12).all()
    easy = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1) > 0.9
    assert easy.any() and (ours[easy] < 0.01 * ce[easy]).all()


def test_softmax_focal_ignore_index():
    logits, labels = logits_and_labels(seed=7)
    masked = labels.clone()
    masked[::3] = -100
    ours = softmax_focal_loss(logits, masked, gamma=0.0, reduction="mean")
    assert torch.allclose(ours, F.cross_entropy(logits, masked, reduction="mean"), atol=1e-6)
    assert (softmax_focal_loss(logits, masked, reduction="none")[::3] == 0).all()


@pytest.mark.parametrize("alpha", [None, 0.25, "per_class"])
def test_softmax_focal_gradcheck(alpha):
    logits, labels = logits_and_labels(n=6, c=4, seed=8, dtype=torch.float64)
    if alpha == "per_class":
        alpha = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: softmax_focal_loss(x, labels, alpha=alpha, gamma=2.0), (logits,))


def test_sigmoid_focal_gradcheck():
    logits, labels = logits_and_labels(n=6, c=4, seed=9, dtype=torch.float64)
    targets = F.one_hot(labels, 4).double()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sigmoid_focal_loss(x, targets, reduction="mean"), (logits,))
