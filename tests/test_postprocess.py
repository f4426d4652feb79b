import math

import pytest
import torch
from torchvision.ops import batched_nms

from detkit.postprocess import _greedy_first, batched_diou_nms, batched_soft_nms, postprocess_detections


def random_case(n: int, classes: int, seed: int):
    """Boxes in a few clusters (so that NMS has work), distinct scores, ``classes`` labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 8, 1), 2, generator=g, dtype=torch.float64) * 200
    c = centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g,
                                                                              dtype=torch.float64) * 6
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 10
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = torch.randperm(n, generator=g).double() / n + 0.01
    labels = torch.randint(classes, (n,), generator=g)
    return boxes, scores, labels


def py_iou_diou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    iou = inter / union
    rho2 = ((a[0] + a[2] - b[0] - b[2]) ** 2 + (a[1] + a[3] - b[1] - b[3]) ** 2) / 4
    c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
    return iou, iou - rho2 / c2


def reference_diou_nms(boxes, scores, labels, thr):
    b, s, lab = boxes.tolist(), scores.tolist(), labels.tolist()
    order = sorted(range(len(b)), key=lambda i: -s[i])
    keep = []
    for i in order:
        if all(lab[k] != lab[i] or py_iou_diou(b[k], b[i])[1] <= thr for k in keep):
            keep.append(i)
    return keep


def reference_soft_nms(boxes, scores, labels, thr, sigma, method, score_thr):
    b, s, lab = boxes.tolist(), scores.tolist(), labels.tolist()
    alive = [i for i in range(len(b)) if s[i] >= score_thr]
    keep, kept = [], []
    while alive:
        m = max(alive, key=lambda i: (s[i], -i))
        keep.append(m)
        kept.append(s[m])
        alive.remove(m)
        for i in alive:
            if lab[i] != lab[m]:
                continue
            u = py_iou_diou(b[m], b[i])[0]
            if method == "linear":
                s[i] *= (1 - u) if u > thr else 1.0
            else:
                s[i] *= math.exp(-u * u / sigma)
        alive = [i for i in alive if s[i] >= score_thr]
    return keep, kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("thr", [0.2, 0.5])
def test_diou_nms_matches_reference(seed, classes, thr):
    boxes, scores, labels = random_case(60, classes, seed)
    assert batched_diou_nms(boxes, scores, labels, thr).tolist() == reference_diou_nms(boxes, scores, labels, thr)


def test_diou_nms_keeps_adjacent_boxes_that_nms_merges():
    # Two flat boxes side by side: IoU 14/26 above 0.5, but their centres are far apart relative to the
    # enclosing box, so IoU − ρ²/c² falls below it.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 2.0], [3.0, 0.0, 13.0, 2.0]])
    scores, labels = torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.long)
    iou, diou = py_iou_diou(*boxes.tolist())
    assert iou > 0.5 > diou
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0]
    assert batched_diou_nms(boxes, scores, labels, 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_diou_nms_equals_torchvision_when_centres_coincide(seed, thr):
    # Concentric boxes make the DIoU penalty 0, so the two criteria agree exactly; clusters far apart so boxes
    # of different clusters do not overlap at all.
    g = torch.Generator().manual_seed(seed)
    n = 80
    centres = torch.tensor([[50.0, 50.0], [250.0, 50.0], [50.0, 250.0], [250, 250]])
    centres = centres[torch.randint(4, (n,), generator=g)]
    wh = torch.rand(n, 2, generator=g) * 30 + 5
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], 1)
    scores, labels = torch.rand(n, generator=g), torch.randint(3, (n,), generator=g)
    assert torch.equal(batched_diou_nms(boxes, scores, labels, thr), batched_nms(boxes, scores, labels, thr))


def test_row_by_row_path_equals_the_matrix_path(monkeypatch):
    import detkit.postprocess as pp

    boxes, scores, labels = random_case(50, 2, 9)
    full = batched_diou_nms(boxes, scores, labels, 0.4)
    monkeypatch.setattr(pp, "MATRIX_LIMIT", 10)  # every class goes greedy row by row
    assert torch.equal(batched_diou_nms(boxes, scores, labels, 0.4), full)
    monkeypatch.setattr(pp, "MATRIX_LIMIT", 30)  # one matrix per class instead of one batch of classes
    assert torch.equal(batched_diou_nms(boxes, scores, labels, 0.4), full)
    soft_rows = batched_soft_nms(boxes, scores, labels, 0.3, method="linear")
    monkeypatch.setattr(pp, "MATRIX_LIMIT", 10_000)
    soft_full = batched_soft_nms(boxes, scores, labels, 0.3, method="linear")
    assert torch.equal(soft_full[0], soft_rows[0]) and torch.allclose(soft_full[1], soft_rows[1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("method,thr,score_thr", [("linear", 0.3, 0.05), ("linear", 0.5, 0.001),
                                                  ("gaussian", 0.0, 0.05)])
def test_soft_nms_matches_reference(seed, classes, method, thr, score_thr):
    boxes, scores, labels = random_case(40, classes, seed)
    keep, kept = batched_soft_nms(boxes, scores, labels, thr, 0.5, method, score_thr)
    ref_keep, ref_kept = reference_soft_nms(boxes, scores, labels, thr, 0.5, method, score_thr)
    assert keep.tolist() == ref_keep
    assert torch.allclose(kept, torch.tensor(ref_kept, dtype=kept.dtype), rtol=1e-9)
    assert (kept.diff() <= 0).all()


def test_soft_nms_gaussian_never_removes_only_lowers_overlaps():
    boxes, scores, labels = random_case(30, 2, 11)
    keep, kept = batched_soft_nms(boxes, scores, labels, method="gaussian", sigma=0.5, score_threshold=0.0)
    assert sorted(keep.tolist()) == list(range(30))
    final = torch.empty_like(scores)
    final[keep] = kept
    assert (final <= scores).all()
    ious = torch.tensor([[py_iou_diou(a, b)[0] for b in boxes.tolist()] for a in boxes.tolist()])
    overlap = (ious > 0) & (labels[:, None] == labels[None]) & ~torch.eye(30, dtype=torch.bool)
    rank = torch.empty(30, dtype=torch.long)
    rank[keep] = torch.arange(30)
    # Lowered exactly when an overlapping box of the same class was taken before it.
    lowered = (overlap & (rank[None, :] < rank[:, None])).any(1)
    assert lowered.sum() > 5 and (~lowered).sum() > 1
    assert (final[lowered] < scores[lowered]).all()
    assert torch.equal(final[~lowered], scores[~lowered])


def test_empty_inputs():
    empty = torch.zeros(0, 4)
    assert batched_diou_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
    keep, kept = batched_soft_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.numel() == 0 and kept.numel() == 0


def reference_postprocess(boxes, scores, score_thr, nms_thr, max_det, topk):
    out = []
    for b in range(scores.shape[0]):
        flat = scores[b].flatten()
        idx = [i for i in flat.argsort(descending=True).tolist()[:topk] if flat[i] > score_thr]
        idx = torch.tensor(idx, dtype=torch.long)
        box_idx, labels = idx // scores.shape[2], idx % scores.shape[2]
        keep = batched_nms(boxes[b, box_idx], flat[idx], labels, nms_thr)[:max_det]
        out.append((boxes[b, box_idx][keep], flat[idx][keep], labels[keep]))
    return out


def dense_case(batch=2, n=120, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([random_case(n, 1, seed * 10 + b)[0].float() for b in range(batch)])
    scores = torch.rand(batch, n, classes, generator=g) ** 4
    return boxes, scores


@pytest.mark.parametrize("seed", range(3))
def test_postprocess_nms_matches_reference_pipeline(seed):
    boxes, scores = dense_case(seed=seed)
    ours = postprocess_detections(boxes, scores, 0.1, 0.5, max_detections=20, method="nms", pre_nms_topk=150)
    for det, (rb, rs, rl) in zip(ours, reference_postprocess(boxes, scores, 0.1, 0.5, 20, 150)):
        assert torch.equal(det["boxes"], rb) and torch.equal(det["scores"], rs) and torch.equal(det["labels"], rl)
        assert len(det["scores"]) <= 20 and (det["scores"] > 0.1).all()


@pytest.mark.parametrize("method", ["nms", "diou"])
@pytest.mark.parametrize("max_det", [1, 7, 60, 5000])
def test_greedy_nms_stopped_early_keeps_the_full_answers_first_boxes(method, max_det):
    # Six tight clusters of 150 boxes: most candidates are suppressed, so the doubling rounds run.
    g = torch.Generator().manual_seed(max_det)
    centres = (torch.rand(6, 2, generator=g, dtype=torch.float64) * 300).repeat_interleave(150, 0)
    c = centres + torch.randn(900, 2, generator=g, dtype=torch.float64) * 2
    wh = torch.rand(900, 2, generator=g, dtype=torch.float64) * 6 + 30
    boxes, scores = torch.cat([c - wh / 2, c + wh / 2], 1), torch.randperm(900, generator=g).double() / 900
    labels = torch.randint(3, (900,), generator=g)
    order = scores.argsort(descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    full = (batched_nms if method == "nms" else batched_diou_nms)(boxes, scores, labels, 0.5)
    early = _greedy_first(boxes, scores, labels, method, 0.5, max_det)
    assert torch.equal(early[:max_det], full[:max_det])
    assert len(early) >= min(max_det, len(full))


@pytest.mark.parametrize("method", ["nms", "diou", "soft"])
def test_postprocess_output_format(method):
    boxes, scores = dense_case(batch=3, seed=4)
    dets = postprocess_detections(boxes, scores, 0.05, 0.5, max_detections=15, method=method,
                                  image_size=(150, 180))
    assert len(dets) == 3
    for det in dets:
        assert set(det) == {"boxes", "scores", "labels"}
        k = len(det["scores"])
        assert 0 < k <= 15 and det["boxes"].shape == (k, 4) and det["labels"].dtype == torch.long
        assert (det["scores"].diff() <= 0).all() and (det["labels"] < 4).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"][:, [0, 2]] <= 180).all()
        assert (det["boxes"][:, [1, 3]] <= 150).all()


def test_postprocess_per_class_boxes_pick_the_labels_box():
    boxes, scores = dense_case(batch=1, n=30, classes=3, seed=5)
    per_class = torch.stack([boxes, boxes + 1000, boxes + 2000], dim=2)  # (B, N, C, 4)
    det = postprocess_detections(per_class, scores, 0.05, 0.5, method="nms")[0]
    shared = postprocess_detections(boxes, scores, 0.05, 0.5, method="nms")[0]
    assert torch.equal(det["labels"], shared["labels"])
    assert torch.allclose(det["boxes"], shared["boxes"] + 1000 * det["labels"][:, None].float())


def test_postprocess_rejects_unknown_method():
    boxes, scores = dense_case(batch=1)
    with pytest.raises(ValueError):
        postprocess_detections(boxes, scores, method="fast")


def test_diou_nms_on_a_long_suppression_chain_matches_greedy():
    # Each box overlaps its neighbours a lot and the boxes two apart less: greedy keeps every other box, which
    # the whole-matrix iteration only reaches after resolving the chain from its top.
    x = torch.arange(40, dtype=torch.float64) * 6
    boxes = torch.stack([x, torch.zeros_like(x), x + 20, torch.full_like(x, 20)], 1)
    scores = torch.linspace(1.0, 0.1, 40, dtype=torch.float64)
    labels = torch.zeros(40, dtype=torch.long)
    keep = batched_diou_nms(boxes, scores, labels, 0.3)
    assert keep.tolist() == reference_diou_nms(boxes, scores, labels, 0.3)
    assert keep.tolist() == list(range(0, 40, 2))
