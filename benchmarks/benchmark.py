"""Synthetic detector outputs and the op, evaluation and SSD timings of ``tools/benchmark.py``.

Every figure is a median over repeats of one call (:mod:`detkit.utils.timing`), next to a torchvision baseline
timed in the same run, so ratios stay meaningful on a busy machine even when absolute times do not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from detkit.anchors import SSD300, ssd_default_boxes
from detkit.postprocess import batched_diou_nms, batched_soft_nms, postprocess_detections
from detkit.utils.resolvers import config_dir
from detkit.utils.timing import median_ms


def train_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The training config (configs/train.yaml: the main job's) with Hydra ``overrides``, outside a Hydra app."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@dataclass
class Timing:
    name: str
    median_ms: float
    baseline_ms: float

    @property
    def ratio(self) -> float:
        return self.median_ms / self.baseline_ms


def synthetic_ssd_outputs(batch: int = 8, num_classes: int = 21, objects: tuple[int, int] = (2, 8), seed: int = 0,
                          device: str = "cpu") -> tuple[Tensor, Tensor]:
    """Decoded SSD300-like outputs: boxes (B, 8732, 4) xyxy pixels and softmax scores (B, 8732, C), column 0
    the background.

    Each image holds a few objects; the default boxes overlapping one (IoU > 0.3) predict a jittered copy of
    it with a confident score for its class, the rest predict background: a few high-scoring clusters over a
    low-scoring floor, the load NMS meets in practice.
    """
    g = torch.Generator().manual_seed(seed)
    priors = ssd_default_boxes(**SSD300)
    n = len(priors)
    boxes = priors.repeat(batch, 1, 1)
    logits = torch.randn(batch, n, num_classes, generator=g)
    logits[..., 0] += 10.0  # background-dominated floor: few pairs above a 0.01 score threshold
    for b in range(batch):
        count = int(torch.randint(objects[0], objects[1] + 1, (1,), generator=g))
        centre = torch.rand(count, 2, generator=g) * 260 + 20
        size = torch.rand(count, 2, generator=g) * 150 + 20
        objs = torch.cat([centre - size / 2, centre + size / 2], 1).clamp(0, 300)
        iou = box_iou(priors, objs)
        best, which = iou.max(1)
        near = best > 0.3
        jitter = torch.randn(int(near.sum()), 4, generator=g) * 0.05 * size[which[near]].repeat(1, 2)
        boxes[b, near] = objs[which[near]] + jitter
        cls = 1 + torch.randint(num_classes - 1, (count,), generator=g)
        logits[b, near, cls[which[near]]] += 6.0 + 8.0 * best[near]
    return boxes.to(device), logits.softmax(-1).to(device)


def flat_candidates(boxes: Tensor, scores: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` highest (box, class) pairs of the first image, background excluded: boxes (n, 4), scores (n,),
    labels (n,) — the input NMS sees after the pre-NMS top-k."""
    fg = scores[0, :, 1:]
    top, idx = fg.flatten().topk(n)
    return boxes[0, idx // fg.shape[1]], top, idx % fg.shape[1]


def postprocess_timings(repeats: int, device: str = "cpu", batch: int = 8, nms_boxes: int = 2000,
                        seed: int = 0) -> list[tuple[str, list[Timing]]]:
    """Two tables: :func:`postprocess_detections` on SSD300-sized outputs with each NMS method, against its
    ``batched_nms`` path; and the NMS functions alone on ``nms_boxes`` candidates, against ``batched_nms``."""
    boxes, scores = synthetic_ssd_outputs(batch, seed=seed, device=device)
    fg = scores[..., 1:]  # postprocess takes no background column
    settings = dict(score_threshold=0.01, nms_threshold=0.45, max_detections=200, pre_nms_topk=1000)
    base = median_ms(lambda: postprocess_detections(boxes, fg, method="nms", **settings), repeats, device=device)
    pipeline = [Timing("postprocess nms (batched_nms)", base, base)]
    for label, extra in [("postprocess diou", dict(method="diou")),
                         ("postprocess soft linear", dict(method="soft", soft_method="linear")),
                         ("postprocess soft gaussian", dict(method="soft", soft_method="gaussian"))]:
        ms = median_ms(lambda extra=extra: postprocess_detections(boxes, fg, **settings, **extra), repeats,
                       device=device)
        pipeline.append(Timing(label, ms, base))

    b, s, lab = flat_candidates(boxes, scores, nms_boxes)
    base = median_ms(lambda: batched_nms(b, s, lab, 0.45), repeats, device=device)
    functions = [Timing("torchvision batched_nms", base, base)]
    for label, fn in [("batched_diou_nms", lambda: batched_diou_nms(b, s, lab, 0.45)),
                      ("batched_soft_nms linear", lambda: batched_soft_nms(b, s, lab, 0.45, method="linear",
                                                                           score_threshold=0.01)),
                      ("batched_soft_nms gaussian", lambda: batched_soft_nms(b, s, lab, method="gaussian",
                                                                             score_threshold=0.01))]:
        functions.append(Timing(label, median_ms(fn, repeats, device=device), base))
    return [(f"postprocess_detections, batch {batch} x {boxes.shape[1]} boxes x {scores.shape[2]} classes",
             pipeline), (f"NMS alone, {nms_boxes} candidates", functions)]


def synthetic_coco_eval(num_images: int = 5000, num_classes: int = 80, objects: tuple[int, int] = (0, 15),
                        seed: int = 0) -> tuple[dict, list[dict]]:
    """COCO ground truth json and results, the load of a COCO-sized validation run: ``num_images`` 640x480
    images with ``objects`` boxes each (all size ranges), every object detected by a jittered box 85% of the
    time (10% of those with a wrong class), plus random false positives; 100 detections per image at most."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(objects[0], objects[1] + 1, num_images)
    n = int(counts.sum())
    image_of = np.repeat(np.arange(1, num_images + 1), counts)
    wh = np.exp(rng.uniform(np.log(6), np.log(300), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([640.0, 480.0]) - wh).clip(0)
    cats = rng.integers(1, num_classes + 1, n)
    data = {"images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"}
                       for i in range(1, num_images + 1)],
            "annotations": [{"id": k + 1, "image_id": int(image_of[k]), "category_id": int(cats[k]),
                             "bbox": [*map(float, xy[k]), *map(float, wh[k])], "area": float(wh[k].prod()),
                             "iscrowd": 0} for k in range(n)],
            "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)]}
    found = rng.random(n) < 0.85
    jitter = rng.normal(0, 0.1, (n, 4)) * np.concatenate([wh, wh], 1)
    det_cats = np.where(rng.random(n) < 0.1, rng.integers(1, num_classes + 1, n), cats)
    det_boxes = np.concatenate([xy + jitter[:, :2], (wh + jitter[:, 2:]).clip(1)], 1)
    noise = rng.integers(0, 30, num_images)
    noise_image = np.repeat(np.arange(1, num_images + 1), noise)
    m = int(noise.sum())
    noise_wh = np.exp(rng.uniform(np.log(6), np.log(300), (m, 2)))
    noise_boxes = np.concatenate([rng.uniform(0, 1, (m, 2)) * (np.array([640.0, 480.0]) - noise_wh).clip(0),
                                  noise_wh], 1)
    image_ids = np.concatenate([image_of[found], noise_image])
    boxes = np.concatenate([det_boxes[found], noise_boxes])
    labels = np.concatenate([det_cats[found], rng.integers(1, num_classes + 1, m)])
    scores = np.concatenate([rng.beta(4, 2, int(found.sum())), rng.beta(1, 4, m)])
    order = np.lexsort((-scores, image_ids))  # by image, best first within an image
    ranked = image_ids[order]
    rank = np.arange(len(order)) - np.searchsorted(ranked, ranked)
    results = [{"image_id": int(image_ids[k]), "category_id": int(labels[k]), "bbox": [*map(float, boxes[k])],
                "score": float(scores[k])} for k, r in zip(order, rank) if r < 100]
    return data, results


def coco_eval_timings(num_images: int = 5000, num_classes: int = 80, repeats: int = 1,
                      seed: int = 0) -> tuple[str, list[Timing]]:
    """:func:`detkit.evaluation.coco.evaluate_coco` (evaluate + accumulate + summarize) with each backend
    against pycocotools on :func:`synthetic_coco_eval` data; backends that are not installed are left out."""
    from pycocotools.coco import COCO

    from detkit.evaluation.coco import STAT_NAMES, evaluate_coco

    data, results = synthetic_coco_eval(num_images, num_classes, seed=seed)
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    reference = evaluate_coco(gt, results)
    base = median_ms(lambda: evaluate_coco(gt, results), repeats, warmup=0)
    rows = [Timing("pycocotools", base, base)]
    if importlib.util.find_spec("faster_coco_eval") is not None:
        fast = evaluate_coco(gt, results, backend="faster_coco_eval")
        worst = max(abs(fast[k] - reference[k]) for k in STAT_NAMES)
        ms = median_ms(lambda: evaluate_coco(gt, results, backend="faster_coco_eval"), repeats, warmup=0)
        rows.append(Timing(f"faster_coco_eval (max |diff| {worst:.1e})", ms, base))
    title = (f"COCO bbox evaluation, {num_images} images x {num_classes} classes, {len(data['annotations'])} "
             f"objects, {len(results)} detections (AP {reference['AP']:.3f})")
    return title, rows


def synthetic_batch(batch: int = 4, size: int = 300, seed: int = 0) -> tuple[Tensor, list[dict]]:
    """Random 0–1 images (B, 3, size, size) and 1–4 random boxes per image (xyxy pixels, 0-based labels < 20)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = (torch.rand(n, 2, generator=g) * 0.35 + 0.05) * size
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(20, (n,), generator=g)})
    return images, targets


def train_step_fn(model: torch.nn.Module, images: Tensor, targets: list[dict], lr: float = 1e-5) -> Callable[[], None]:
    """A callable running one training step of ``model`` on the batch: forward in train mode, backward,
    SGD (momentum 0.9) step. Images go in as a list, the interface torchvision's detectors take too."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        model.train()
        loss = sum(model(list(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def inference_fn(model: torch.nn.Module, images: Tensor) -> Callable[[], object]:
    """A callable running ``model`` in eval mode on the batch, post-processing included."""
    def run() -> object:
        model.eval()
        with torch.no_grad():
            return model(list(images))
    return run


def ssd_timings(repeats: int, batch: int = 4, num_classes: int = 21, warmup: int = 1,
                seed: int = 0) -> list[tuple[str, list[Timing]]]:
    """detkit's SSD300 against ``torchvision.models.detection.ssd300_vgg16`` (both random init, same 300 px
    batch): a training step (forward, backward, SGD step) and inference with post-processing.

    Post-processing settings are equal: score > 0.01 per class, NMS 0.45, 200 detections; detkit keeps its
    best 400·C (box, class) pairs before NMS where torchvision keeps 400 per class. ``num_classes`` counts the
    background, as torchvision does.
    """
    from torchvision.models.detection import ssd300_vgg16

    from detkit.models.backbones.vgg import VGG16SSD
    from detkit.models.detectors.ssd import SSD

    torch.manual_seed(seed)
    ours = SSD(num_classes - 1, VGG16SSD(), score_thresh=0.01, nms_thresh=0.45, max_det=200)
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    images, targets = synthetic_batch(batch, 300, seed)
    # torchvision's labels count the background as 0.
    shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]

    base = median_ms(train_step_fn(theirs, images, shifted, lr=1e-4), repeats, warmup)
    train = [Timing("torchvision ssd300_vgg16", base, base),
             Timing("detkit SSD300", median_ms(train_step_fn(ours, images, targets, lr=1e-4), repeats, warmup), base)]
    base = median_ms(inference_fn(theirs, images), repeats, warmup)
    inference = [Timing("torchvision ssd300_vgg16", base, base),
                 Timing("detkit SSD300", median_ms(inference_fn(ours, images), repeats, warmup), base)]
    size = f"batch {batch} x 3 x 300 x 300, {num_classes} classes with background"
    return [(f"SSD300 training step (forward, backward, SGD), {size}", train),
            (f"SSD300 inference with post-processing (0.01, NMS 0.45, top 200), {size}", inference)]


def format_table(title: str, rows: list[Timing]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [title, f"  {'':{width}}  {'median ms':>10}  {'x baseline':>10}"]
    lines += [f"  {r.name:{width}}  {r.median_ms:10.2f}  {r.ratio:10.2f}" for r in rows]
    return "\n".join(lines)
