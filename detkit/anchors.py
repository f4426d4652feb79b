"""Prior boxes of the detector zoo: SSD default boxes, FPN/RPN grid anchors, the G-CNN initial grid, and
YOLOv2 dimension clusters.

Pure functions of sizes, no state. Boxes are xyxy in absolute pixels of the network input; anchor shapes are
(w, h) in pixels. Orders are location-major: for each level, for each cell in row-major order, every box of
that cell, so a head output reshaped (B, H, W, A, ·) → (B, H·W·A, ·) lines up with the anchors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["SSD300", "ssd_default_boxes", "ssd_prior_config", "ssd_relative_boxes", "grid_anchors",
           "torchvision_anchors", "ANCHOR_LAYOUTS",
           "anchors_per_location", "gcnn_grid", "grid_iou_recall",
           "gcnn_grid_count", "gcnn_box_sides", "shape_iou", "kmeans_anchors", "ratio_recall", "iou_recall",
           "ssd_box_shapes", "grid_anchor_shapes"]

SSD300 = dict(
    image_size=300,
    feature_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)


def _tile(centers: Tensor, wh: Tensor) -> Tensor:
    """(P, 2) centres × (A, 2) shapes → (P·A, 4) xyxy, every shape at a centre before the next centre."""
    half = wh[None] / 2
    return torch.cat([centers[:, None] - half, centers[:, None] + half], dim=-1).reshape(-1, 4)


def _cell_centers(height: int, width: int, step_y: float, step_x: float, offset: float) -> Tensor:
    """(H·W, 2) (x, y) centres of a feature map's cells in input pixels, row-major."""
    ys = (torch.arange(height, dtype=torch.float32) + offset) * step_y
    xs = (torch.arange(width, dtype=torch.float32) + offset) * step_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, (int, float)) else (value[0], value[1])


def ssd_default_boxes(image_size: int | Sequence[int], feature_sizes: Sequence[int | Sequence[int]],
                      steps: Sequence[float | Sequence[float]],
                      min_sizes: Sequence[float], max_sizes: Sequence[float],
                      aspect_ratios: Sequence[Sequence[float]], clip: bool = True) -> Tensor:
    """SSD default boxes (Liu et al. 2016) → (N, 4) xyxy pixels.

    At level k, cell (i, j) is centred at ((j + 0.5)·step_k, (i + 0.5)·step_k) and holds, in this order: a
    square of side min_k, a square of side √(min_k·max_k), then for each ratio r a (min_k·√r) × (min_k/√r)
    box followed by its transpose. ``image_size`` is an int or (height, width); ``clip`` clamps boxes to it.
    A feature size and a step may each be an int or (height, width) pairs, for non-square inputs.
    ``ssd_default_boxes(**SSD300)`` gives the 8732 boxes of SSD300.
    """
    boxes = []
    for f, step, s_min, s_max, ratios in zip(feature_sizes, steps, min_sizes, max_sizes, aspect_ratios):
        fh, fw = _pair(f)
        sy, sx = _pair(step)
        shapes = [(s_min, s_min), (math.sqrt(s_min * s_max),) * 2]
        for r in ratios:
            shapes += [(s_min * math.sqrt(r), s_min / math.sqrt(r)), (s_min / math.sqrt(r), s_min * math.sqrt(r))]
        boxes.append(_tile(_cell_centers(fh, fw, sy, sx, 0.5), torch.tensor(shapes, dtype=torch.float32)))
    out = torch.cat(boxes)
    if clip:
        h, w = _pair(image_size)
        out = torch.min(out.clamp(min=0), torch.tensor([w, h, w, h], dtype=out.dtype))
    return out


def ssd_prior_config(reference: Mapping, image_size: Sequence[int],
                     feature_sizes: Sequence[Sequence[int]], prior_size: float | None = None) -> dict:
    """Arguments of :func:`ssd_default_boxes` for an input of ``image_size`` = (height, width) whose feature maps
    are ``feature_sizes`` ((h, w) per level), from a ``reference`` configuration such as :data:`SSD300`.

    At the reference's own image and feature sizes the reference is returned unchanged (SSD300's rounded steps
    8, 16, 32, 64, 100, 300). At any other size a level's step is the input side over the map side, per axis,
    so every map still tiles the whole input (with pooling that rounds up, sizes do not scale in proportion);
    box sizes scale with √(height·width) / reference size, so priors keep their share of the image. With
    ``prior_size`` (a side in pixels) box sizes are those of a ``prior_size``² input whatever the input: pixels,
    as anchors are, so that a network trained at one size predicts the same boxes at another.
    """
    h, w = image_size
    ref_h, ref_w = _pair(reference["image_size"])
    sizes = [tuple(f) for f in feature_sizes]
    if len(sizes) != len(reference["feature_sizes"]):
        raise ValueError(f"{len(sizes)} feature maps for a prior configuration of {len(reference['feature_sizes'])}")
    box_h, box_w = (prior_size, prior_size) if prior_size else (h, w)
    if ((box_h, box_w) == (ref_h, ref_w) and (h, w) == (ref_h, ref_w)
            and sizes == [_pair(f) for f in reference["feature_sizes"]]):
        return dict(reference)
    scale = math.sqrt(box_h * box_w / (ref_h * ref_w))
    return dict(reference, image_size=(h, w), feature_sizes=sizes, steps=[(h / fh, w / fw) for fh, fw in sizes],
                min_sizes=[s * scale for s in reference["min_sizes"]],
                max_sizes=[s * scale for s in reference["max_sizes"]])


def ssd_relative_boxes(image_size: int | Sequence[int], feature_sizes: Sequence[int | Sequence[int]],
                       scales: Sequence[float], aspect_ratios: Sequence[Sequence[float]],
                       steps: Sequence[float] | None = None, clip: bool = True,
                       prior_size: float | None = None) -> Tensor:
    """SSD default boxes whose sides are fractions of the input's sides (torchvision's ``DefaultBoxGenerator``)
    → (N, 4) xyxy pixels, in :func:`ssd_default_boxes`' order.

    Level k (``scales`` has one more entry than levels) holds, per cell, the relative (w, h) shapes
    (s_k, s_k), (√(s_k·s_k+1),)·2, then per ratio r (s_k·√r, s_k/√r) and its transpose; with ``clip`` each
    relative side is clamped to [0, 1] (the boxes themselves are not clipped to the image). Cell (i, j) is
    centred at ((j + 0.5)/n_x, (i + 0.5)/n_y) of the image, n = side / ``steps[k]`` (the map's own size when
    ``steps`` is None), so a fixed step keeps its pixel spacing at every input size. Relative coordinates are
    computed in float32 and scaled to ``image_size`` = (height, width) last, as torchvision does. With
    ``prior_size`` the shapes are fractions of a ``prior_size``² input instead, in pixels at any input (the
    centres still tile this one).
    """
    h, w = _pair(image_size)
    if len(scales) != len(feature_sizes) + 1:
        raise ValueError(f"{len(scales)} scales for {len(feature_sizes)} levels: give one more scale than levels")
    boxes = []
    for k, (f, ratios) in enumerate(zip(feature_sizes, aspect_ratios)):
        fh, fw = _pair(f)
        cells_y, cells_x = (h / steps[k], w / steps[k]) if steps is not None else (fh, fw)
        xs = ((torch.arange(fw) + 0.5) / cells_x).float()
        ys = ((torch.arange(fh) + 0.5) / cells_y).float()
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        s, s_next = scales[k], math.sqrt(scales[k] * scales[k + 1])
        shapes = [(s, s), (s_next, s_next)]
        for r in ratios:
            shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        shapes = torch.tensor(shapes, dtype=torch.float32)
        shapes = shapes.clamp(0, 1) if clip else shapes
        centers = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)
        if prior_size:
            centers, shapes = centers * torch.tensor([w, h]), shapes * float(prior_size)
        boxes.append(_tile(centers, shapes))
    out = torch.cat(boxes)
    return out if prior_size else out * torch.tensor([w, h, w, h], dtype=torch.float32)


def _per_level(ratios: Sequence[float] | Sequence[Sequence[float]], levels: int) -> list[Sequence[float]]:
    if len(ratios) and isinstance(ratios[0], (int, float)):
        return [ratios] * levels
    if len(ratios) != levels:
        raise ValueError(f"got ratios for {len(ratios)} levels, sizes for {levels}")
    return list(ratios)


def anchors_per_location(sizes: Sequence[Sequence[float]],
                         ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0)) -> list[int]:
    """Anchors at each location of each level: len(sizes[l]) · len(ratios[l]) — what the head must predict."""
    return [len(s) * len(r) for s, r in zip(sizes, _per_level(ratios, len(sizes)))]


def grid_anchors(feature_sizes: Sequence[int | Sequence[int]], strides: Sequence[int | Sequence[int]],
                 sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
                 offset: float = 0.5) -> list[Tensor]:
    """RPN / RetinaNet anchors (Ren et al. 2015; Lin et al. 2017), one (H·W·A, 4) xyxy pixel tensor per level.

    Level l has a ``feature_sizes[l]`` (int or (H, W)) map of stride ``strides[l]``; each location holds, for
    each size s of ``sizes[l]`` and each ratio r = h/w (the same ``ratios`` for every level, or one sequence
    per level), a box of area s² with w = s/√r, h = s·√r, ordered size-major then ratio. Centres are at
    ((j + offset)·stride, (i + offset)·stride): 0.5 is the centre of the cell's receptive field;
    torchvision's AnchorGenerator and detectron2 put them at offset 0.

    The default is FPN's layout (one size per level, P2–P6, 3 anchors per location);
    ``sizes=((32, 64, 128, 256, 512),)`` on one level is Faster R-CNN's 15 anchors per location.
    """
    out = []
    for f, stride, level_sizes, level_ratios in zip(feature_sizes, strides, sizes, _per_level(ratios, len(sizes))):
        fh, fw = _pair(f)
        sy, sx = _pair(stride)
        shapes = [(s / math.sqrt(r), s * math.sqrt(r)) for s in level_sizes for r in level_ratios]
        out.append(_tile(_cell_centers(fh, fw, sy, sx, offset), torch.tensor(shapes, dtype=torch.float32)))
    return out


# How a detector lays anchors on its maps: detkit's cell-centred grid at nominal strides, or torchvision's.
ANCHOR_LAYOUTS = ("centered", "torchvision")


def torchvision_anchors(feature_sizes: Sequence[int | Sequence[int]], image_size: Sequence[int],
                        sizes: Sequence[Sequence[float]],
                        ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0)) -> list[Tensor]:
    """The anchors of torchvision's ``AnchorGenerator`` for maps of ``feature_sizes`` computed from a padded
    input of ``image_size`` = (H, W), one (h_l·w_l·A, 4) xyxy tensor per level. Unlike :func:`grid_anchors`:
    the stride per axis is ⌊H / h_l⌋, ⌊W / w_l⌋ (not a power of 2 where a map's side was rounded up:
    ⌊160 / 3⌋ = 53), corners are (j·stride ± round(w/2), i·stride ± round(h/2)) (offset 0, half extents rounded
    half to even), and a cell's shapes are ratio-major (every size of the first ratio, then the next).
    Shapes as in :func:`grid_anchors`: area s², ratio r = h/w."""
    out = []
    for f, level_sizes, level_ratios in zip(feature_sizes, sizes, _per_level(ratios, len(sizes))):
        fh, fw = _pair(f)
        shapes = torch.tensor([(s / math.sqrt(r), s * math.sqrt(r)) for r in level_ratios for s in level_sizes],
                              dtype=torch.float32)
        centers = _cell_centers(fh, fw, image_size[0] // fh, image_size[1] // fw, 0.0)
        out.append(_tile(centers, 2 * torch.round(shapes / 2)))
    return out


def _tiles_per_axis(scale: float, overlap: float) -> int:
    # Enough tiles that consecutive ones step by at most side·(1 − overlap); the epsilon keeps 1/3-type
    # fractions from rounding up to an extra tile.
    return math.ceil((1.0 - scale) / (scale * (1.0 - overlap)) - 1e-9) + 1


def gcnn_box_sides(scale: float, ratio: float = 1.0) -> tuple[float, float]:
    """(width, height) of a :func:`gcnn_grid` box of scale ``scale`` and ratio h / w ``ratio``, as fractions of
    the image's sides: area scale², each side at most 1."""
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scales must be in (0, 1], got {scale}")
    if not 0.0 < ratio < math.inf:
        raise ValueError(f"ratios must be > 0 and finite, got {ratio}")
    root = math.sqrt(ratio)
    return min(1.0, scale / root), min(1.0, scale * root)


def gcnn_grid_count(scales: Sequence[float] = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5), overlap: float = 0.5,
                    ratios: Sequence[float] = (1.0,)) -> int:
    """Number of boxes :func:`gcnn_grid` makes: Σ over scales s and ratios r of n(w_s,r)·n(h_s,r), with
    n(f) = ⌈(1 − f) / (f·(1 − overlap))⌉ + 1 for a side fraction f (n_s² for squares)."""
    total = 0
    for s in scales:
        for r in ratios:
            fw, fh = gcnn_box_sides(s, r)
            total += _tiles_per_axis(fw, overlap) * _tiles_per_axis(fh, overlap)
    return total


def gcnn_grid(image_size: int | Sequence[int], scales: Sequence[float] = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5),
              overlap: float = 0.5, ratios: Sequence[float] = (1.0,)) -> Tensor:
    """G-CNN's initial boxes (Najibi et al., CVPR 2016): a multi-scale regular grid of overlapping boxes.

    At scale s a box spans the fraction s of the image's width and of its height (square on a square image);
    n_s = ⌈(1 − s) / (s·(1 − overlap))⌉ + 1 boxes per axis are spread evenly from one border to the other, so
    neighbours overlap by at least ``overlap`` of a side, every box lies inside the image and the boxes of a
    scale cover it. ``image_size`` is an int or (height, width). Returns (Σ n_s², 4) xyxy pixels, scale by
    scale, row-major.

    ``ratios`` (h / w; not in the paper, whose boxes are squares) gives each scale boxes of the same area and
    those shapes, w = s / √r and h = s·√r of the image's sides (at most 1), each side tiled by the same rule:
    a grid shaped like the data's objects (tall digits, standing people) assigns more of them at a given count.
    Order: scale by scale, within a scale ratio by ratio.

    The defaults (s = 1, 1/2, 1/3, 1/4, 1/5, half-side steps, so n = 2m − 1 for s = 1/m) give
    1 + 9 + 25 + 49 + 81 = 165 boxes, the paper's "around 180" order of magnitude
    (``gcnn_grid_count()``).
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if not len(scales) or not len(ratios):
        raise ValueError(f"a grid needs at least one scale and one ratio, got scales {list(scales)} and ratios "
                         f"{list(ratios)}")
    h, w = _pair(image_size)
    boxes = []
    for s in scales:
        for r in ratios:
            fw, fh = gcnn_box_sides(s, r)
            xs = torch.linspace(0.0, 1.0 - fw, _tiles_per_axis(fw, overlap), dtype=torch.float64)
            ys = torch.linspace(0.0, 1.0 - fh, _tiles_per_axis(fh, overlap), dtype=torch.float64)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            x0, y0 = x0.reshape(-1), y0.reshape(-1)
            boxes.append(torch.stack([x0 * w, y0 * h, (x0 + fw) * w, (y0 + fh) * h], dim=1))
    return torch.cat(boxes).float()


def shape_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """(N, M) IoU between box shapes ``wh1`` (N, 2) and ``wh2`` (M, 2), the boxes aligned at a common centre."""
    inter = torch.min(wh1[:, None], wh2[None]).prod(dim=2)
    return inter / (wh1.prod(dim=1)[:, None] + wh2.prod(dim=1)[None] - inter)


def kmeans_anchors(wh: Tensor, k: int = 9, iters: int = 300, seed: int = 0) -> tuple[Tensor, float]:
    """YOLOv2 dimension clusters (Redmon & Farhadi 2017): k-means of box shapes with distance 1 − IoU.

    Args:
        wh: (N, 2) positive box widths and heights in pixels, N ≥ k.
        k: number of anchors.
        iters: at most this many assignment/update rounds; stops earlier once assignments stop changing.
        seed: the k-means++ initialisation draws from a generator seeded with this; same seed, same result.

    Returns:
        anchors (k, 2) (w, h) sorted by area, and the mean over boxes of the best IoU with an anchor.
    """
    wh = wh.to(torch.float64).reshape(-1, 2)
    if (wh <= 0).any():
        raise ValueError("box widths and heights must be positive")
    if len(wh) < k:
        raise ValueError(f"need at least k={k} boxes, got {len(wh)}")
    gen = torch.Generator().manual_seed(seed)
    # k-means++ on 1 − IoU: each new centre is a box drawn with probability ∝ its distance² to the nearest
    # centre so far, which spreads the start over the shapes present.
    centers = wh[torch.randint(len(wh), (1,), generator=gen)]
    for _ in range(1, k):
        d = 1.0 - shape_iou(wh, centers).amax(dim=1)
        weights = d**2 if d.sum() > 0 else torch.ones_like(d)
        centers = torch.cat([centers, wh[torch.multinomial(weights, 1, generator=gen)]])
    assign = None
    for _ in range(iters):
        iou = shape_iou(wh, centers)
        new_assign = iou.argmax(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k).to(wh.dtype)
        sums = torch.zeros_like(centers).index_add_(0, assign, wh)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            # A cluster that lost every box restarts at the boxes its neighbours fit worst.
            worst = iou.amax(dim=1).argsort()[: int(empty.sum())]
            centers[empty] = wh[worst]
    centers = centers[centers.prod(dim=1).argsort()]
    mean_iou = shape_iou(wh, centers).amax(dim=1).mean().item()
    return centers.float(), mean_iou


def ratio_recall(wh: Tensor, anchors: Tensor, thresh: float = 4.0) -> float:
    """Best possible recall of YOLOv5's shape-ratio rule: the fraction of box shapes ``wh`` (N, 2) for which
    some anchor of ``anchors`` (A, 2) has max(w/aw, aw/w, h/ah, ah/h) < ``thresh``; 0 without boxes."""
    if not len(wh):
        return 0.0
    ratio = wh[:, None].to(torch.float64) / anchors[None].to(torch.float64)
    worst = torch.max(ratio, 1 / ratio).amax(dim=2)
    return (worst.amin(dim=1) < thresh).double().mean().item()


def iou_recall(wh: Tensor, shapes: Tensor, thresh: float = 0.5) -> float:
    """Best possible recall of IoU matching: the fraction of box shapes ``wh`` (N, 2) whose best
    :func:`shape_iou` with a prior shape of ``shapes`` (A, 2), both centred, is at least ``thresh`` (an upper
    bound: a prior off the box's centre overlaps it less); 0 without boxes."""
    if not len(wh):
        return 0.0
    return (shape_iou(wh.to(torch.float64), shapes.to(torch.float64)).amax(dim=1) >= thresh).double().mean().item()


def grid_iou_recall(wh: Tensor, shapes: Tensor, strides: Tensor, thresh: float = 0.5, positions: int = 8) -> float:
    """Best possible recall of IoU matching on a grid of prior centres: the share of box shapes ``wh`` (N, 2),
    each placed at ``positions``² points spread over a ``max(strides)``-pixel square (a low-discrepancy
    sequence), whose best IoU with a prior is at least ``thresh``, where a prior of shape ``shapes[a]`` (A, 2)
    sits at the centre of its level's cell nearest the box (cells of side ``strides[a]``, (A,), centred at
    (k + 0.5)·stride). Unlike :func:`iou_recall` it sees that a prior about the stride's size overlaps a box
    between two cell centres by much less than a centred one (SSD default boxes at 1.6× their stride leave a
    fifth of same-size objects without a box at IoU 0.5); it ignores the image's border. 0 without boxes."""
    if not len(wh):
        return 0.0
    wh, shapes, strides = wh.to(torch.float64), shapes.to(torch.float64), strides.to(torch.float64)
    # a low-discrepancy (R2) sequence: its points' offsets modulo every stride spread evenly, where a regular grid's
    # would coincide for strides that divide its spacing
    k = torch.arange(positions * positions, dtype=torch.float64)[:, None] + 0.5
    points = (k * torch.tensor([0.7548776662466927, 0.5698402909980532], dtype=torch.float64)) % 1.0 * strides.max()
    # offset of each point from the nearest cell centre of each prior's level: (P, A, 2)
    offset = (points[:, None] % strides[None, :, None]) - strides[None, :, None] / 2
    half_p = shapes / 2  # (A, 2)
    hits = torch.zeros(len(wh), dtype=torch.float64)
    for chunk in torch.split(torch.arange(len(wh)), 2048):
        half_b = wh[chunk, None, None] / 2  # (n, 1, 1, 2)
        lo = torch.maximum(offset[None] - half_b, -half_p[None, None])
        hi = torch.minimum(offset[None] + half_b, half_p[None, None])
        inter = (hi - lo).clamp(min=0).prod(dim=-1)  # (n, P, A)
        union = wh[chunk].prod(dim=1)[:, None, None] + shapes.prod(dim=1)[None, None] - inter
        best = (inter / union).amax(dim=2)  # (n, P)
        hits[chunk] = (best >= thresh).double().mean(dim=1)
    return hits.mean().item()


def ssd_box_shapes(min_sizes: Sequence[float], max_sizes: Sequence[float],
                   aspect_ratios: Sequence[Sequence[float]], steps: Sequence[float] | None = None) -> Tensor:
    """(A, 2) (w, h) of every default-box shape of :func:`ssd_default_boxes`, level by level; with ``steps`` (one
    per level, a number or (y, x)) (A, 3): (w, h, its level's step; √(y·x) for a pair)."""
    shapes = []
    for level, (s_min, s_max, ratios) in enumerate(zip(min_sizes, max_sizes, aspect_ratios)):
        level_shapes = [(s_min, s_min), (math.sqrt(s_min * s_max),) * 2]
        for r in ratios:
            level_shapes += [(s_min * math.sqrt(r), s_min / math.sqrt(r)),
                             (s_min / math.sqrt(r), s_min * math.sqrt(r))]
        if steps is not None:
            step_y, step_x = _pair(steps[level])
            level_shapes = [(*shape, math.sqrt(step_y * step_x)) for shape in level_shapes]
        shapes += level_shapes
    return torch.tensor(shapes, dtype=torch.float32)


def grid_anchor_shapes(sizes: Sequence[Sequence[float]],
                       ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0)) -> Tensor:
    """(A, 2) (w, h) of every anchor shape of :func:`grid_anchors`, level by level."""
    shapes = [(s / math.sqrt(r), s * math.sqrt(r))
              for level_sizes, level_ratios in zip(sizes, _per_level(ratios, len(sizes)))
              for s in level_sizes for r in level_ratios]
    return torch.tensor(shapes, dtype=torch.float32)
