"""YOLO9000's WordTree: sibling-set softmaxes, path products, the walk down, the tree loss, tree checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.errors import ConfigError
from detkit.wordtree import WordTree, check_parents

# The built-in data's tree (configs/data/builtin_wordtree.yaml): digits 0-9, then "loops" (10), "no_loops" (11).
PARENTS = [10, 11, 11, 11, 11, 11, 10, 11, 10, 10, -1, -1]
SETS = [[10, 11], [0, 6, 8, 9], [1, 2, 3, 4, 5, 7]]


def test_each_sibling_set_is_a_softmax_summing_to_one():
    tree = WordTree(PARENTS)
    logits = torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(0)) * 3
    cond = tree.log_conditional(logits).exp()
    for members in SETS:
        torch.testing.assert_close(cond[..., members].sum(-1), torch.ones(5, 3))
        torch.testing.assert_close(cond[..., members], logits[..., members].softmax(-1))


def test_a_path_product_is_the_leaf_absolute_probability_by_hand():
    tree = WordTree(PARENTS)
    logits = torch.linspace(-2.0, 3.0, 12)
    x = logits.tolist()
    # "4": P(no_loops) among the roots times P(4 | no_loops) among 1, 2, 3, 4, 5, 7
    p_root = math.exp(x[11]) / (math.exp(x[10]) + math.exp(x[11]))
    p_leaf = math.exp(x[4]) / sum(math.exp(x[i]) for i in SETS[2])
    absolute = tree.log_absolute(logits).exp()
    assert absolute[4].item() == pytest.approx(p_root * p_leaf, rel=1e-5)
    assert absolute[11].item() == pytest.approx(p_root, rel=1e-5)
    # the leaves under a node share out its probability
    torch.testing.assert_close(absolute[SETS[2]].sum(), absolute[11])


def test_walk_down_reaches_a_leaf_or_stops_at_an_internal_node():
    tree = WordTree(PARENTS)
    logits = torch.full((3, 12), 0.0)
    logits[0, 11], logits[0, 4] = 5.0, 8.0  # P(no_loops) ≈ 0.99, P(4 | no_loops) ≈ 0.99: the leaf "4"
    logits[1, 10] = 5.0  # "loops" ≈ 0.99 but its children tie at 1/4: stops at "loops"
    logits[2, 10], logits[2, 0] = 0.2, 0.5  # "loops" 0.55 passes; its best child "0" (0.355) makes 0.195: stop
    node, prob = tree.walk_down(logits, thresh=0.5)
    assert node.tolist() == [4, 10, 10]
    absolute = tree.log_absolute(logits).exp()
    torch.testing.assert_close(prob, absolute[torch.arange(3), node])
    # a lower threshold lets row 2 descend to its best child "0" (0.195 > 0.1)
    assert tree.walk_down(logits, thresh=0.1)[0][2].item() == 0


def test_tree_loss_of_a_leaf_is_the_sum_of_the_cross_entropies_along_its_path():
    tree = WordTree(PARENTS)
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    labels = torch.tensor([9, 3])
    expected = (F.cross_entropy(logits[0, SETS[0]], torch.tensor(0)) + F.cross_entropy(logits[0, SETS[1]],
                                                                                         torch.tensor(3))
                + F.cross_entropy(logits[1, SETS[0]], torch.tensor(1)) + F.cross_entropy(logits[1, SETS[2]],
                                                                                          torch.tensor(2)))
    loss = tree.loss(logits, labels)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[0, SETS[2]].abs().sum() == 0  # "9" says nothing about the no_loops digits
    # an internal label trains its own sibling set only
    torch.testing.assert_close(tree.loss(logits, torch.tensor([10])), F.cross_entropy(logits[:1, SETS[0]],
                                                                                       torch.tensor([0])))


@pytest.mark.parametrize("parents, message", [
    ([1, 2, 0, -1], "cycle through class 0"),
    ([-1, 5, 0], r"parents\[1\] is 5"),
    ([-1, 1], r"parents\[1\] is 1"),
    ([-1, "0"], r"parents\[1\] is '0'"),
    ([], "is empty"),
])
def test_a_bad_tree_is_a_clear_config_error(parents, message):
    with pytest.raises(ConfigError, match=message):
        check_parents(parents)
