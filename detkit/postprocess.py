"""From dense predictions to detections: class-aware DIoU-NMS and Soft-NMS, and the per-image pipeline
(threshold, top-k, NMS, cap) that turns (B, N, C) scores into the common detector output.

Plain greedy NMS is ``torchvision.ops.batched_nms``. The variants here treat each class on its own (boxes of
different classes never interact, so this is exact, and costs Σ n_c² instead of N² pairs) and loop over
greedy steps, one per kept box, each step vectorised over the class's remaining boxes. DIoU-NMS instead
iterates a whole-matrix rule (Cluster-NMS) to the same answer, on all classes at once as a padded batch of
per-class matrices. A pairwise matrix is computed once when it has
at most ``MATRIX_LIMIT`` rows, one row per step otherwise. Boxes are
xyxy in absolute pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, distance_box_iou

from detkit.boxes import elementwise_iou, remove_small

__all__ = ["MATRIX_LIMIT", "batched_diou_nms", "batched_soft_nms", "best_per_class", "postprocess_detections"]

# Up to this many boxes in a class, its (n, n) float matrix (64 MiB at 4096) is computed once.
MATRIX_LIMIT = 4096


def _class_groups(idxs: Tensor) -> list[Tensor]:
    """Indices of the boxes of each distinct ``idxs`` value, ascending within a group."""
    order = idxs.argsort(stable=True)
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1]
    return list(order.split(counts.tolist()))


def _rows(boxes: Tensor, pairwise: Callable[[Tensor, Tensor], Tensor]) -> Callable[[int], Tensor]:
    """Row i of ``pairwise(boxes, boxes)``: from one matrix when it fits, else computed on demand."""
    if len(boxes) <= MATRIX_LIMIT:
        matrix = pairwise(boxes, boxes)
        return lambda i: matrix[i]
    return lambda i: pairwise(boxes[i : i + 1], boxes)[0]


def _at_least_float32(boxes: Tensor) -> Tensor:
    # Half precision (and integer boxes) lose overlaps near the threshold; float64 stays float64.
    return boxes.to(torch.promote_types(boxes.dtype, torch.float32))


def _by_score(keep: Tensor, scores: Tensor) -> Tensor:
    """``keep`` reordered by decreasing ``scores`` (aligned with ``keep``), ties by lower index."""
    keep, pos = keep.sort()
    scores = scores[pos]
    order = scores.argsort(descending=True, stable=True)
    return keep[order], scores[order]


def _cluster_nms(suppresses: Tensor) -> Tensor:
    """Greedy NMS's keep mask (..., n) from the (..., n, n) "row i would suppress column j" relation of
    score-sorted boxes, batched over leading dimensions.

    Cluster-NMS (Zheng et al. 2021): "j survives iff no surviving higher-scoring box suppresses j", iterated
    from "all survive", fixes at least one more box per pass and stops at greedy NMS's unique answer; a pass is
    one matrix op, and the passes needed are the longest suppression chain, a handful in practice.
    """
    suppresses = suppresses.triu(diagonal=1)
    keep = torch.ones(suppresses.shape[:-1], dtype=torch.bool, device=suppresses.device)
    for _ in range(suppresses.shape[-1]):
        survivors = ~(suppresses & keep[..., :, None]).any(dim=-2)
        if torch.equal(survivors, keep):
            break
        keep = survivors
    return keep


def _diou_nms_rows(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """One class, too many boxes for a matrix: greedy steps, one DIoU row each."""
    order = scores.argsort(descending=True, stable=True)
    boxes = _at_least_float32(boxes[order])
    remaining = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    kept = []
    while True:
        # First remaining box in score order: argmax returns the first maximum.
        i = int(remaining.byte().argmax())
        if not remaining[i]:
            break
        kept.append(i)
        remaining &= distance_box_iou(boxes[i : i + 1], boxes)[0] <= iou_threshold
        remaining[i] = False
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


def _pad_by_class(boxes: Tensor, order: Tensor, idxs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes ``order`` (grouped by class) as a (G, M, 4) batch: returns (padded, valid (G, M), group, slot),
    box ``order[j]`` sitting at ``[group[j], slot[j]]``."""
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1]
    groups, longest = len(counts), int(counts.max())
    group = torch.repeat_interleave(torch.arange(groups, device=boxes.device), counts)
    slot = torch.arange(len(order), device=boxes.device) - (torch.cumsum(counts, 0) - counts)[group]
    padded = boxes.new_zeros((groups, longest, 4), dtype=torch.promote_types(boxes.dtype, torch.float32))
    padded[group, slot] = boxes[order].to(padded.dtype)
    valid = torch.zeros((groups, longest), dtype=torch.bool, device=boxes.device)
    valid[group, slot] = True
    return padded, valid, group, slot


def _diou_nms_padded(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Greedy DIoU-NMS of every class at once: the classes' score-sorted boxes padded into a (G, M, 4) batch,
    one (G, M, M) DIoU tensor and Cluster-NMS on the batch. Returns kept indices, grouped by class."""
    order = scores.argsort(descending=True, stable=True)
    order = order[idxs[order].argsort(stable=True)]  # by class, then by decreasing score
    padded, valid, group, slot = _pad_by_class(boxes, order, idxs)
    diou = elementwise_iou(padded[:, :, None], padded[:, None, :], "diou", eps=0.0)
    return order[_cluster_nms((diou > iou_threshold) & valid[:, :, None])[group, slot]]


def _size_buckets(idxs: Tensor) -> list[Tensor]:
    """Indices of the boxes of classes with 2^k < n ≤ 2^(k+1) boxes, one tensor per k: padding a class to
    its bucket's longest wastes under 4x its pairs, and each bucket is one batched call."""
    classes, inverse, counts = torch.unique(idxs, return_inverse=True, return_counts=True)
    bucket = torch.ceil(torch.log2(counts.double())).long()[inverse]
    return [(bucket == b).nonzero().squeeze(1) for b in torch.unique(bucket).tolist()]


def batched_diou_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware greedy NMS with the DIoU criterion (Zheng et al. 2020).

    A box is suppressed by a higher-scoring kept box of the same ``idxs`` value when IoU − ρ²/c² exceeds
    ``iou_threshold`` (ρ: distance between centres, c: diagonal of the smallest enclosing box), so that
    overlapping boxes with distant centres, often two adjacent objects, both survive.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). idxs: (N,) integer class (or image·class) of each box.

    Returns:
        (K,) long indices of kept boxes, by decreasing score (ties: lower index first).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device)
    keep = []
    for members in _size_buckets(idxs):
        counts = torch.unique(idxs[members], return_counts=True)[1]
        if len(counts) * int(counts.max()) ** 2 <= MATRIX_LIMIT**2:
            keep.append(members[_diou_nms_padded(boxes[members], scores[members], idxs[members], iou_threshold)])
            continue
        for group in _class_groups(idxs[members]):  # too big for one tensor: class by class
            one = members[group]
            nms = _diou_nms_rows if len(one) > MATRIX_LIMIT else _diou_nms_padded
            args = (boxes[one], scores[one]) + (() if nms is _diou_nms_rows else (idxs[one],))
            keep.append(one[nms(*args, iou_threshold)])
    keep = torch.cat(keep)
    return _by_score(keep, scores[keep])[0]


def _soft_nms_one_class(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, method: str,
                        score_threshold: float) -> tuple[Tensor, Tensor]:
    def decay(a: Tensor, b: Tensor) -> Tensor:
        iou = box_iou(a, b).to(scores.dtype)
        if method == "linear":
            factor = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
        else:
            factor = torch.exp(-(iou * iou) / sigma)
        # Strictly positive, so that −∞ (taken or dropped) stays −∞ instead of turning into NaN.
        return factor.clamp(min=torch.finfo(factor.dtype).tiny)

    row = _rows(_at_least_float32(boxes), decay)
    current = scores.masked_fill(scores < score_threshold, float("-inf"))
    keep, kept = [], []
    while True:
        best, i = current.max(dim=0)
        if best.item() == float("-inf"):
            break
        i = int(i)
        keep.append(i)
        kept.append(best)
        current = current * row(i)
        current[i] = float("-inf")
        current.masked_fill_(current < score_threshold, float("-inf"))
    device = boxes.device
    if not keep:
        return torch.empty((0,), dtype=torch.long, device=device), scores.new_empty((0,))
    return torch.tensor(keep, dtype=torch.long, device=device), torch.stack(kept)


def _soft_nms_padded(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, sigma: float,
                     method: str, score_threshold: float) -> tuple[Tensor, Tensor]:
    """Soft-NMS of every class at once: each greedy step takes the best remaining box of every class, so the
    steps are the most boxes any one class keeps, not their sum."""
    order = idxs.argsort(stable=True)  # by class, then by index: max() then breaks ties by lower index
    padded, valid, group, slot = _pad_by_class(boxes, order, idxs)
    iou = elementwise_iou(padded[:, :, None], padded[:, None, :], "iou", eps=0.0).nan_to_num(0.0).to(scores.dtype)
    if method == "linear":
        factor = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    else:
        factor = torch.exp(-(iou * iou) / sigma)
    # Strictly positive, so that −∞ (taken or dropped) stays −∞ instead of turning into NaN.
    factor = factor.clamp(min=torch.finfo(factor.dtype).tiny)
    current = torch.full(valid.shape, float("-inf"), dtype=scores.dtype, device=scores.device)
    current[group, slot] = scores[order]
    current.masked_fill_(current < score_threshold, float("-inf"))
    index = torch.zeros(valid.shape, dtype=torch.long, device=boxes.device)
    index[group, slot] = order
    keep, kept = [], []
    while True:
        best, i = current.max(dim=1)
        active = (best > float("-inf")).nonzero().squeeze(1)
        if not len(active):
            break
        i = i[active]
        keep.append(index[active, i])
        kept.append(best[active])
        current[active] *= factor[active, i]
        current[active, i] = float("-inf")
        current.masked_fill_(current < score_threshold, float("-inf"))
    if not keep:
        return torch.empty((0,), dtype=torch.long, device=boxes.device), scores.new_empty((0,))
    return torch.cat(keep), torch.cat(kept)


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
                     method: str = "linear", score_threshold: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Class-aware Soft-NMS (Bodla et al. 2017): overlapping boxes are down-weighted instead of removed.

    Greedily take the remaining box of highest (decayed) score; every remaining box of the same class with
    IoU u to it has its score multiplied by 1 − u when u > ``iou_threshold`` (``linear``) or by
    exp(−u²/``sigma``) (``gaussian``, ``iou_threshold`` unused); boxes whose score falls below
    ``score_threshold`` are dropped.

    Args:
        boxes: (N, 4) xyxy. scores: (N,). idxs: (N,) integer class of each box.

    Returns:
        kept indices (K,) long and their decayed scores (K,), by decreasing decayed score (ties: lower index).
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"unknown soft-NMS method {method!r}; expected linear or gaussian")
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=boxes.device), scores.new_empty((0,))
    keep, kept = [], []
    for members in _size_buckets(idxs):
        counts = torch.unique(idxs[members], return_counts=True)[1]
        if len(counts) * int(counts.max()) ** 2 <= MATRIX_LIMIT**2:
            k, s = _soft_nms_padded(boxes[members], scores[members], idxs[members], iou_threshold, sigma, method,
                                    score_threshold)
            keep.append(members[k])
            kept.append(s)
            continue
        for group in _class_groups(idxs[members]):  # too big for one tensor: class by class, row by row
            one = members[group]
            k, s = _soft_nms_one_class(boxes[one], scores[one], iou_threshold, sigma, method, score_threshold)
            keep.append(one[k])
            kept.append(s)
    return _by_score(torch.cat(keep), torch.cat(kept))


METHODS = ("nms", "diou", "soft")

# The first NMS call of :func:`_greedy_first` takes this many times ``max_detections`` candidates.
FIRST_CHUNK = 4


def _greedy_first(boxes: Tensor, scores: Tensor, labels: Tensor, method: str, iou_threshold: float,
                  max_detections: int) -> Tensor:
    """Greedy (DIoU-)NMS of score-sorted candidates, stopped once ``max_detections`` boxes are kept.

    Whether greedy NMS keeps a box depends only on the higher-scoring boxes, so NMS over a prefix of the
    sorted candidates keeps exactly the full answer's boxes within that prefix. Each round runs NMS on the
    boxes kept so far (they keep each other: no suppression among them) plus the next chunk (doubling), and
    stops when ``max_detections`` are kept or the candidates run out: the same first ``max_detections`` as
    one NMS over all candidates, at a fraction of the cost when most candidates are low-scoring clutter
    (an untrained or uncertain network gives thousands above a 0.01 threshold).

    Args:
        boxes: (N, 4) xyxy. scores: (N,) in decreasing order. labels: (N,) class of each box.

    Returns:
        (K,) long indices of kept boxes, K ≤ N, ascending (by decreasing score, ties in input order); at least
        the first ``max_detections`` of the full NMS answer when it has that many.
    """
    nms = batched_nms if method == "nms" else batched_diou_nms
    n = len(scores)
    kept = torch.empty((0,), dtype=torch.long, device=scores.device)
    start, end = 0, min(n, FIRST_CHUNK * max_detections)
    while True:
        idx = torch.cat([kept, torch.arange(start, end, device=scores.device)])
        kept = idx[nms(boxes[idx], scores[idx], labels[idx], iou_threshold)]
        if len(kept) >= max_detections or end == n:
            # Positions in the sorted candidates: ascending is decreasing score, ties in candidate order
            # (NMS's own sort leaves the order of equal scores unspecified).
            return kept.sort().values
        start, end = end, min(n, 2 * end)


def best_per_class(scores: Tensor, labels: Tensor, k: int) -> Tensor:
    """Ascending indices of the ``k`` highest ``scores`` (N,) of each ``labels`` (N,) value (all of a class
    with fewer): Caffe SSD's and torchvision's per-class top-k before NMS. Ties go to the lower index."""
    order = scores.argsort(descending=True, stable=True)
    order = order[labels[order].argsort(stable=True)]  # by class, then by decreasing score
    sorted_labels = labels[order]
    counts = torch.unique_consecutive(sorted_labels, return_counts=True)[1]
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(len(order), device=scores.device) - starts
    return order[rank < k].sort().values


@torch.no_grad()
def postprocess_detections(boxes: Tensor, scores: Tensor, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                           max_detections: int = 100, method: str = "nms", pre_nms_topk: int | None = 1000,
                           image_size: Sequence[int] | None = None, soft_method: str = "linear",
                           sigma: float = 0.5, class_topk: int | None = None, min_size: float = 0.0
                           ) -> list[dict[str, Tensor]]:
    """Per image: keep (box, class) pairs scoring above ``score_threshold``, the ``pre_nms_topk`` best of
    them (and with ``class_topk``, first the ``class_topk`` best of each class: :func:`best_per_class`),
    class-aware NMS, then the ``max_detections`` best. Greedy NMS (``nms``, ``diou``) stops as soon as
    ``max_detections`` boxes are kept (:func:`_greedy_first`: the same answer, cheaper).

    Args:
        boxes: (B, N, 4) xyxy pixels shared by all classes (SSD, YOLO, RetinaNet), or (B, N, C, 4) one box
            per class (Fast/Faster R-CNN heads).
        scores: (B, N, C) class probabilities, without a background column (slice it off first: SSD's
            softmax column 0), so label c means column c.
        method: ``nms`` (torchvision ``batched_nms``), ``diou`` (:func:`batched_diou_nms`) or ``soft``
            (:func:`batched_soft_nms` with ``nms_threshold``, ``soft_method`` and ``sigma``; the decayed scores
            are returned and ``score_threshold`` also drops boxes decayed below it).
        pre_nms_topk: None keeps every pair above the threshold (torchvision's Faster R-CNN).
        image_size: (height, width) to clip boxes to before NMS; None leaves them as they are.
        class_topk: candidates kept per class before the overall ``pre_nms_topk``; None: no per-class limit.
        min_size: after clipping, boxes narrower or lower than this (pixels) are dropped before NMS
            (torchvision's Faster R-CNN: 0.01); 0 keeps all.

    Returns:
        one dict per image: ``boxes`` (K, 4) xyxy, ``scores`` (K,) decreasing, ``labels`` (K,) long.
    """
    if method not in METHODS:
        raise ValueError(f"unknown NMS method {method!r}; expected one of {', '.join(METHODS)}")
    batch, _, num_classes = scores.shape
    flat = scores.reshape(batch, -1)
    passed = flat > score_threshold
    results = []
    # Image by image (greedy NMS grows with the square of the candidates it is given, so one call for the whole
    # batch is slower, measured with tools/benchmark.py): threshold first, then top-k of the survivors only, a
    # few hundred for a trained detector against the ~90,000 (box, class) pairs of a 384 px YOLO.
    for b in range(batch):
        cand = passed[b].nonzero().squeeze(1)
        cand_scores = flat[b, cand]
        if class_topk is not None and len(cand):
            top = best_per_class(cand_scores, cand % num_classes, class_topk)
            cand, cand_scores = cand[top], cand_scores[top]
        # top-k leaves the order of equal scores unspecified: index order
        if pre_nms_topk is not None and len(cand) > pre_nms_topk:
            top = cand_scores.topk(pre_nms_topk).indices.sort().values
            cand, cand_scores = cand[top], cand_scores[top]
        cand_scores, top = cand_scores.sort(descending=True, stable=True)
        cand = cand[top]
        box_idx, labels = cand // num_classes, cand % num_classes
        cand_boxes = boxes[b, box_idx] if boxes.dim() == 3 else boxes[b, box_idx, labels]
        if image_size is not None:
            h, w = image_size
            cand_boxes = torch.min(cand_boxes.clamp(min=0), cand_boxes.new_tensor([w, h, w, h]))
        if min_size > 0:
            large = remove_small(cand_boxes, min_size)
            cand_boxes, cand_scores, labels = cand_boxes[large], cand_scores[large], labels[large]
        if method == "soft":
            keep, kept_scores = batched_soft_nms(cand_boxes, cand_scores, labels, nms_threshold, sigma, soft_method,
                                                 score_threshold)
        else:
            keep = _greedy_first(cand_boxes, cand_scores, labels, method, nms_threshold, max_detections)
            kept_scores = cand_scores[keep]
        keep, kept_scores = keep[:max_detections], kept_scores[:max_detections]
        results.append({"boxes": cand_boxes[keep], "scores": kept_scores, "labels": labels[keep]})
    return results
