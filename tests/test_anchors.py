import math

import pytest
import torch

from detkit.anchors import (
    SSD300,
    anchors_per_location,
    gcnn_box_sides,
    gcnn_grid,
    gcnn_grid_count,
    grid_anchors,
    kmeans_anchors,
    shape_iou,
    ssd_default_boxes,
)


def centers_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]


def test_ssd300_has_8732_boxes():
    boxes = ssd_default_boxes(**SSD300)
    assert boxes.shape == (38**2 * 4 + 19**2 * 6 + 10**2 * 6 + 5**2 * 6 + 3**2 * 4 + 1**2 * 4, 4) == (8732, 4)
    assert (boxes >= 0).all() and (boxes <= 300).all()


def test_ssd_boxes_per_cell_centres_and_sides():
    boxes = ssd_default_boxes(**{**SSD300, "clip": False})
    start = 0
    for f, step, s_min, s_max, ratios in zip(SSD300["feature_sizes"], SSD300["steps"], SSD300["min_sizes"],
                                             SSD300["max_sizes"], SSD300["aspect_ratios"]):
        per_cell = 2 + 2 * len(ratios)
        level = boxes[start : start + f * f * per_cell].view(f, f, per_cell, 4)
        start += f * f * per_cell
        for i, j in [(0, 0), (f - 1, f // 2), (f // 2, f - 1)]:
            c, wh = centers_and_sizes(level[i, j])
            expected_c = torch.tensor([(j + 0.5) * step, (i + 0.5) * step])
            assert torch.allclose(c, expected_c.expand_as(c), atol=1e-3)
            assert torch.allclose(wh[0], torch.tensor([s_min, s_min], dtype=torch.float32))
            big = math.sqrt(s_min * s_max)
            assert torch.allclose(wh[1], torch.tensor([big, big]), atol=1e-4)
            for n, r in enumerate(ratios):
                w, h = wh[2 + 2 * n]
                assert w / h == pytest.approx(r, rel=1e-5) and w * h == pytest.approx(s_min**2, rel=1e-5)
                assert torch.allclose(wh[3 + 2 * n], wh[2 + 2 * n].flip(0))
    assert start == len(boxes)


def test_ssd_clip_keeps_boxes_inside_a_non_square_image():
    boxes = ssd_default_boxes((200, 300), [(5, 8)], [40], [60], [120], [(2,)], clip=True)
    assert len(boxes) == 5 * 8 * 4
    assert (boxes[:, [0, 2]] <= 300).all() and (boxes[:, [1, 3]] <= 200).all() and (boxes >= 0).all()


def test_fpn_layout_three_anchors_per_location_per_level():
    sizes = ((32,), (64,), (128,), (256,), (512,))
    strides = (4, 8, 16, 32, 64)
    feats = [(256 // s, 320 // s) for s in strides]
    levels = grid_anchors(feats, strides, sizes, (0.5, 1.0, 2.0))
    assert anchors_per_location(sizes, (0.5, 1.0, 2.0)) == [3] * 5
    for anchors, (fh, fw), stride, (size,) in zip(levels, feats, strides, sizes):
        assert anchors.shape == (fh * fw * 3, 4)
        c, wh = centers_and_sizes(anchors)
        assert torch.allclose(wh.prod(1), torch.full((len(wh),), float(size**2)), rtol=1e-5)
        ratio = (wh[:, 1] / wh[:, 0]).view(fh, fw, 3)
        assert torch.allclose(ratio, torch.tensor([0.5, 1.0, 2.0]).expand_as(ratio), rtol=1e-5)
        grid = c.view(fh, fw, 3, 2)
        j, i = fw - 1, fh - 1
        assert torch.allclose(grid[i, j], torch.tensor([(j + 0.5) * stride, (i + 0.5) * stride]).expand(3, 2))
        assert torch.allclose(grid[0, 0], torch.full((3, 2), 0.5 * stride))


def test_all_sizes_on_one_level_give_fifteen_per_location():
    sizes = ((32, 64, 128, 256, 512),)
    assert anchors_per_location(sizes) == [15]
    (anchors,) = grid_anchors([(3, 4)], [16], sizes, offset=0.0)
    assert anchors.shape == (3 * 4 * 15, 4)
    c, wh = centers_and_sizes(anchors.view(3, 4, 15, 4)[1, 2])
    assert torch.allclose(c, torch.tensor([2 * 16.0, 1 * 16.0]).expand(15, 2))
    areas = wh.prod(1).view(5, 3)
    expected = torch.tensor([32.0, 64, 128, 256, 512])[:, None] ** 2
    assert torch.allclose(areas, expected.expand(5, 3), rtol=1e-5)


def test_per_level_ratios():
    sizes = ((16,), (32, 48))
    assert anchors_per_location(sizes, ((1.0,), (0.5, 2.0))) == [1, 4]
    a, b = grid_anchors([2, 1], [8, 16], sizes, ((1.0,), (0.5, 2.0)))
    assert a.shape == (4, 4) and b.shape == (4, 4)
    with pytest.raises(ValueError):
        grid_anchors([2, 1], [8, 16], sizes, ((1.0,),))


@pytest.mark.parametrize("scales,overlap", [((1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5), 0.5), ((0.3, 0.7), 0.25),
                                            ((0.45,), 0.0), ((1 / 3, 0.2), 0.75)])
def test_gcnn_grid_count_inside_and_coverage(scales, overlap):
    h, w = 120, 200
    boxes = gcnn_grid((h, w), scales, overlap)
    assert len(boxes) == gcnn_grid_count(scales, overlap)
    assert (boxes[:, :2] >= -1e-4).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    start = 0
    for s in scales:
        n = math.ceil(round((1 - s) / (s * (1 - overlap)), 9)) + 1
        level = boxes[start : start + n * n]
        start += n * n
        c, wh = centers_and_sizes(level)
        assert torch.allclose(wh, torch.tensor([s * w, s * h]).expand_as(wh), rtol=1e-5)
        # Every pixel centre lies in some box of this scale.
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
        inside = ((pts[:, None] >= level[None, :, :2]) & (pts[:, None] <= level[None, :, 2:])).all(2).any(1)
        assert inside.all()
        # Neighbours along x overlap by at least the requested fraction of a side.
        if n > 1:
            xs0 = level.view(n, n, 4)[0, :, 0]
            assert (xs0.diff() <= s * w * (1 - overlap) + 1e-3).all()
    assert start == len(boxes)


@pytest.mark.parametrize("ratios", [(2.0,), (0.5, 1.0, 3.0), (9.0,)])
def test_gcnn_grid_ratios_shape_count_and_coverage(ratios):
    h, w, scales, overlap = 120, 200, (1 / 2, 1 / 5), 0.5
    boxes = gcnn_grid((h, w), scales, overlap, ratios)
    assert len(boxes) == gcnn_grid_count(scales, overlap, ratios)
    assert (boxes[:, :2] >= -1e-4).all() and (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
    start = 0
    for s in scales:
        for r in ratios:
            fw, fh = min(1.0, s / math.sqrt(r)), min(1.0, s * math.sqrt(r))
            assert gcnn_box_sides(s, r) == pytest.approx((fw, fh))
            nx = math.ceil(round((1 - fw) / (fw * (1 - overlap)), 9)) + 1
            ny = math.ceil(round((1 - fh) / (fh * (1 - overlap)), 9)) + 1
            level = boxes[start : start + nx * ny]
            start += nx * ny
            _, wh = centers_and_sizes(level)
            assert torch.allclose(wh, torch.tensor([fw * w, fh * h]).expand_as(wh), rtol=1e-5)
            if fw < 1 and fh < 1:  # the shape asked for: h / w = r of the image's sides, area s² of the image
                assert torch.allclose(wh[:, 1] / h / (wh[:, 0] / w), torch.tensor(r), rtol=1e-5)
            # the boxes of each shape cover the image
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
            assert ((pts[:, None] >= level[None, :, :2]) & (pts[:, None] <= level[None, :, 2:])).all(2).any(1).all()
    assert start == len(boxes)
    assert torch.equal(gcnn_grid((h, w), scales, overlap, (1.0,)), gcnn_grid((h, w), scales, overlap))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="ratios must be > 0 and finite"):
            gcnn_grid(64, scales, overlap, (bad,))
    with pytest.raises(ValueError, match="at least one scale and one ratio"):
        gcnn_grid(64, scales, overlap, ())


def test_gcnn_default_count():
    assert gcnn_grid_count() == 1 + 9 + 25 + 49 + 81 == len(gcnn_grid(600))


def three_shape_boxes(seed: int = 0, noise: float = 0.03):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[12.0, 20.0], [60.0, 45.0], [150.0, 240.0]])
    idx = torch.arange(3).repeat_interleave(200)
    wh = shapes[idx] * (1 + noise * (2 * torch.rand(len(idx), 2, generator=g) - 1))
    return wh, shapes


def test_kmeans_recovers_known_shapes():
    wh, shapes = three_shape_boxes()
    anchors, mean_iou = kmeans_anchors(wh, k=3, seed=0)
    assert anchors.shape == (3, 2)
    assert torch.allclose(anchors, shapes, rtol=0.03)
    assert mean_iou > 0.9
    expected = shape_iou(wh.double(), anchors.double()).amax(1).mean().item()
    assert mean_iou == pytest.approx(expected, rel=1e-5)


def test_kmeans_same_seed_same_result_and_sorted_by_area():
    g = torch.Generator().manual_seed(5)
    wh = torch.rand(300, 2, generator=g) * 200 + 2
    a1, m1 = kmeans_anchors(wh, k=9, seed=3)
    a2, m2 = kmeans_anchors(wh, k=9, seed=3)
    assert torch.equal(a1, a2) and m1 == m2
    area = a1.prod(1)
    assert (area.diff() >= 0).all()
    # More clusters never fit worse on average than fewer, on the same data.
    assert m1 > kmeans_anchors(wh, k=2, seed=3)[1]


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError):
        kmeans_anchors(torch.ones(2, 2), k=3)
    with pytest.raises(ValueError):
        kmeans_anchors(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), k=1)
