"""YOLO9000's WordTree: hierarchical classification over a tree of classes (Redmon & Farhadi, 2017, §4).

Every node of the tree, leaf or internal, is a class of the detector's output (YOLO9000's 9,418 outputs include
internal synsets such as "dog"). A node's logit is read as a conditional probability: one softmax per sibling set
(the children of one node, the roots forming one more set), so P(node | parent) sums to 1 over each set. A node's
absolute probability is the product of the conditionals along its path from its root. Training a label is a
cross-entropy on every sibling set along its path: the label and each of its ancestors is the positive of its own
set. Inference walks down from the roots (:meth:`WordTree.walk_down`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.errors import ConfigError


def check_parents(parents: Sequence[int], where: str = "model.wordtree.parents") -> list[int]:
    """``parents`` as a list of ints if it describes a forest: entry ``i`` is node ``i``'s parent index, −1 for a
    root, every other entry a node index other than ``i``, no cycle. Otherwise a :class:`ConfigError` naming
    ``where`` and the first bad node."""
    parents = list(parents)
    n = len(parents)
    if n == 0:
        raise ConfigError(f"{where} is empty: give each class's parent index, -1 for a root")
    for i, p in enumerate(parents):
        if isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < n or p == i:
            raise ConfigError(f"{where}[{i}] is {p!r}: a parent must be -1 (a root) or the index of another of the "
                              f"{n} classes")
    for start in range(n):
        node, steps = start, 0
        while node != -1:
            node, steps = parents[node], steps + 1
            if steps > n:
                raise ConfigError(f"{where} has a cycle through class {start}: following parents from it never "
                                  "reaches a root (-1)")
    return parents


class WordTree(nn.Module):
    """A class tree over C outputs and the probabilities, losses and predictions YOLO9000 reads from it.

    Args:
        parents: (C,) parent index of each class, −1 for a root (:func:`check_parents`).

    Buffers (not in the state dict: they follow from the config): ``group`` (C,) the sibling set of each node
    (set ``g`` holds the children of node ``group_parent[g]``, −1: the roots); ``path`` (C, D) the nodes from
    each node up to its root (itself first), padded with C, D the tree's depth; ``child_mask`` (C + 1, C) bool, row
    ``p + 1`` marking the children of node ``p`` (row 0: the roots). Memory is O(C·D), not O(C²): 9,418 classes
    fit.
    """

    def __init__(self, parents: Sequence[int]) -> None:
        super().__init__()
        self.parents = check_parents(parents)
        n = len(self.parents)
        set_parents = sorted(set(self.parents))
        self.group_parent = set_parents
        index = {p: g for g, p in enumerate(set_parents)}
        self.register_buffer("group", torch.tensor([index[p] for p in self.parents]), persistent=False)
        paths = []
        for c in range(n):
            path, node = [], c
            while node != -1:
                path.append(node)
                node = self.parents[node]
            paths.append(path)
        self.depth = max(len(p) for p in paths)
        self.register_buffer("path", torch.tensor([p + [n] * (self.depth - len(p)) for p in paths]),
                             persistent=False)
        children = torch.zeros(n + 1, n, dtype=torch.bool)
        children[torch.tensor(self.parents) + 1, torch.arange(n)] = True
        self.register_buffer("child_mask", children, persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.parents)

    def log_conditional(self, logits: Tensor) -> Tensor:
        """(..., C) logits → (..., C) log P(node | its parent): a log-softmax over each sibling set."""
        shape = (*logits.shape[:-1], len(self.group_parent))
        group = self.group.expand_as(logits)
        top = logits.new_full(shape, float("-inf")).scatter_reduce(-1, group, logits, "amax")
        shifted = logits - top.gather(-1, group).detach()
        total = logits.new_zeros(shape).scatter_add(-1, group, shifted.exp())
        return shifted - total.log().gather(-1, group)

    def log_absolute(self, logits: Tensor) -> Tensor:
        """(..., C) logits → (..., C) log P(node): the sum of log-conditionals along each node's path."""
        padded = F.pad(self.log_conditional(logits), (0, 1))  # column C: log 1, the paths' padding
        return padded[..., self.path].sum(dim=-1)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed tree cross-entropy: ``logits`` (P, C), ``labels`` (P,) node indices; per label, the sum over
        the sibling sets on its path of −log P(path node | its parent)."""
        padded = F.pad(self.log_conditional(logits), (0, 1))
        return -padded.gather(1, self.path[labels]).sum()

    @torch.no_grad()
    def walk_down(self, logits: Tensor, thresh: float = 0.5) -> tuple[Tensor, Tensor]:
        """The predicted node of each row of ``logits`` (N, C): from the roots, take the most probable child while
        the path product (its absolute probability) stays above ``thresh``; stop at a leaf, or at the last node
        whose best child falls below it (an internal node is a valid label). The best root is taken whatever its
        probability, so every row gets a label (darknet's ``hierarchy_top_prediction``).

        Returns (N,) node indices and (N,) their absolute probabilities.
        """
        cond = self.log_conditional(logits.float()).exp()
        node = torch.full(cond.shape[:-1], -1, dtype=torch.long, device=cond.device)
        prob = torch.ones(cond.shape[:-1], device=cond.device)
        for _ in range(self.depth):
            options = self.child_mask[node + 1]
            best_prob, best = cond.masked_fill(~options, -1.0).max(dim=-1)
            step = options.any(dim=-1) & ((prob * best_prob > thresh) | (node == -1))
            node = torch.where(step, best, node)
            prob = torch.where(step, prob * best_prob, prob)
        return node, prob
