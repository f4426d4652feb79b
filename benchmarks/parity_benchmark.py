"""Training parity with torchvision: ``tools/benchmark.py parity`` trains detkit's detector and torchvision's same
detector on the same data and scores both with detkit's pycocotools evaluation.

Pairs (:data:`PAIRS`): detkit ``ssdlite_mnv3`` vs ``ssdlite320_mobilenet_v3_large`` (same layers, same parameter
count); detkit ``fpn_rcnn`` vs ``FasterRCNN`` and detkit ``retinanet`` vs ``RetinaNet``, both sides on a randomly
initialised ResNet-18 FPN (torchvision's ``*_resnet50_fpn`` builders with ``resnet18``: CPU-feasible), torchvision's
settings (anchors, IoU thresholds, sampling, top-k, post-processing) taken from detkit's model config.

Both sides run :func:`train_model`, one loop, rather than detkit's trainer for detkit and a copy of it for
torchvision: the requirement is the same optimizer, schedule, batches, epochs and augmentation, and the trainer adds
what a torchvision model would not get (EMA, autocast, channels_last, Mosaic close-out, the budget planner). The
loop takes from the config what both share: the optimizer and lr schedule (:func:`detkit.app.build.
build_optimization`, lr scaling and weight-decay groups included), the gradient clipping, the training loader
(same seed: same images, order and augmentation), the seed before each model's initialisation. Mosaic and
multi-scale are off and the evaluation size is the training size (:data:`COMMON`), overridable.

torchvision's models get detkit's tensors through :class:`TorchvisionDetector`: 0–1 letterboxed images, their
transform set to each batch's own size (no resize: both see the same pixels) with detkit's mean and std; labels
shifted to 1..C for the models with a background class 0 (SSD, Faster R-CNN) and back in their predictions.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from benchmarks.peer_benchmark import ap_ratio, in_repository, scoped_overrides
from benchmarks.zoo_benchmark import torch_threads
from detkit.api import compose_train_config
from detkit.app.build import (
    build_data_loader,
    build_dataset,
    build_model,
    build_optimization,
    prepare_data,
    seed_everything,
)
from detkit.engine.hooks import write_json
from detkit.errors import ConfigError
from detkit.evaluation.coco import predict
from detkit.evaluation.dataset import evaluate_dataset

PAIRS = ("ssdlite", "fpn_rcnn", "retinanet")
# detkit's side of each pair, before the user's overrides; torchvision's is built to match it.
PAIR_OVERRIDES = {
    "ssdlite": ["model=ssdlite_mnv3", "data.img_size=320"],
    "fpn_rcnn": ["model=fpn_rcnn", "model.backbone.depth=18"],
    "retinanet": ["model=retinanet", "model.backbone.depth=18", "model.p6_from=p5"],
}
COMMON = ["data.mosaic.prob=0.0", "data.multiscale.sizes=[]", "data.test_size=${data.img_size}"]
TORCHVISION_NAMES = {"ssdlite": "ssdlite320_mobilenet_v3_large", "fpn_rcnn": "fasterrcnn_resnet{depth}_fpn",
                     "retinanet": "retinanet_resnet{depth}_fpn"}
# Models whose class 0 is the background: detkit's label k is their k + 1.
LABEL_OFFSET = {"ssdlite": 1, "fpn_rcnn": 1, "retinanet": 0}


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind detkit's interface: ``images`` (B, 3, H, W) 0–1, ``targets`` with
    0-based ``labels``; predictions with 0-based ``labels``. Its transform resizes nothing (min/max/fixed size set
    to each batch's (H, W)); ``label_offset``: 1 for a model whose class 0 is the background, else 0."""

    def __init__(self, model: nn.Module, label_offset: int) -> None:
        super().__init__()
        self.model, self.label_offset = model, label_offset

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        images = list(images)
        h, w = images[0].shape[-2:]
        transform = self.model.transform
        transform.min_size, transform.max_size = (min(h, w),), max(h, w)
        if transform.fixed_size is not None:
            transform.fixed_size = (w, h)  # torchvision's (width, height)
        if self.training:
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
            return self.model(images, shifted)
        return [dict(d, labels=d["labels"] - self.label_offset) for d in self.model(images)]


def _torchvision_fpn(cfg: DictConfig, returned_layers: list[int], extra_blocks: nn.Module | None = None):
    """torchvision's ResNet-FPN extractor (random init, every layer trainable, plain BatchNorm) at detkit's
    backbone depth and FPN width."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    backbone = cfg.backbone
    if backbone.get("width", 64) != 64 or backbone.get("depths"):
        raise ConfigError(f"model.backbone width={backbone.get('width')} depths={backbone.get('depths')}: "
                          "torchvision's side is a standard ResNet; leave width at 64 and depths unset")
    net = getattr(resnet, f"resnet{backbone.depth}")(weights=None)
    channels = [net.inplanes // 8 * 2 ** (i - 1) for i in returned_layers]  # 64·2^(i-1) (basic), ×4 bottleneck
    return BackboneWithFPN(net, {f"layer{i}": str(k) for k, i in enumerate(returned_layers)}, channels,
                           cfg.fpn_channels, extra_blocks)


def _faster_rcnn(cfg: DictConfig, num_classes: int, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    rpn = cfg.rpn
    backbone = _torchvision_fpn(cfg, [1, 2, 3, 4])
    anchors = AnchorGenerator(tuple(tuple(s) for s in rpn.sizes), (tuple(rpn.ratios),) * len(rpn.sizes))
    box_head = TwoMLPHead(cfg.fpn_channels * cfg.pool_size**2, cfg.representation)
    return FasterRCNN(backbone, None, image_mean=mean, image_std=std, rpn_anchor_generator=anchors,
                      rpn_pre_nms_top_n_train=rpn.pre_nms_topk.train, rpn_pre_nms_top_n_test=rpn.pre_nms_topk.test,
                      rpn_post_nms_top_n_train=rpn.post_nms_topk.train,
                      rpn_post_nms_top_n_test=rpn.post_nms_topk.test, rpn_nms_thresh=rpn.nms_threshold,
                      rpn_fg_iou_thresh=rpn.fg_iou, rpn_bg_iou_thresh=rpn.bg_iou,
                      rpn_batch_size_per_image=rpn.batch_per_image, rpn_positive_fraction=rpn.positive_fraction,
                      box_head=box_head, box_predictor=FastRCNNPredictor(cfg.representation, num_classes + 1),
                      box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
                      box_detections_per_img=cfg.max_det, box_fg_iou_thresh=cfg.roi_fg_iou,
                      box_bg_iou_thresh=cfg.roi_bg_iou[1], box_batch_size_per_image=cfg.roi_batch,
                      box_positive_fraction=cfg.roi_fg_fraction)


def _retinanet(cfg: DictConfig, num_classes: int, mean: list[float], std: list[float]) -> nn.Module:
    from functools import partial

    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if cfg.num_convs != 4 or cfg.head_norm not in ("none", "gn"):
        raise ConfigError(f"model.num_convs={cfg.num_convs} model.head_norm={cfg.head_norm}: torchvision's "
                          "RetinaNet head has 4 convs, plain or with GroupNorm (none or gn)")
    c5 = 512 if cfg.backbone.depth < 50 else 2048
    p6_in = cfg.fpn_channels if cfg.p6_from == "p5" else c5  # torchvision takes P5 when the widths agree
    backbone = _torchvision_fpn(cfg, [2, 3, 4], LastLevelP6P7(p6_in, cfg.fpn_channels))
    sizes = tuple(tuple(s * k for k in cfg.anchor_scales) for s in cfg.anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(cfg.ratios),) * len(sizes))
    norm = partial(nn.GroupNorm, 32) if cfg.head_norm == "gn" else None
    head = RetinaNetHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
    return RetinaNet(backbone, num_classes, image_mean=mean, image_std=std, anchor_generator=anchors, head=head,
                     score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.max_det,
                     fg_iou_thresh=cfg.fg_iou, bg_iou_thresh=cfg.bg_iou, topk_candidates=cfg.topk_per_level)


def _ssdlite(cfg: DictConfig, num_classes: int, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    if cfg.backbone.width != 1.0:
        raise ConfigError(f"model.backbone.width={cfg.backbone.width}: torchvision's SSDLite builder has width 1 only")
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                         image_mean=mean, image_std=std)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"ssdlite": _ssdlite, "fpn_rcnn": _faster_rcnn,
                                                  "retinanet": _retinanet}


def torchvision_model(pair: str, cfg: DictConfig, num_classes: int, ours: nn.Module) -> TorchvisionDetector:
    """torchvision's detector of ``pair`` for ``num_classes`` object classes, matched to detkit's model config
    ``cfg.model`` and normalised as ``ours`` (detkit's built model) is."""
    mean, std = ours.image_mean.flatten().tolist(), ours.image_std.flatten().tolist()
    return TorchvisionDetector(_BUILDERS[pair](cfg.model, num_classes, mean, std), LABEL_OFFSET[pair])


def pair_overrides(pair: str, overrides: Sequence[str]) -> list[str]:
    """The user's ``overrides`` that apply to ``pair``: the plain ones and those written ``PAIR:key=value`` for
    it (``retinanet:model.head_norm=gn``, a key the other pairs' models lack), unprefixed."""
    return scoped_overrides(pair, PAIRS, overrides, "parity pair")


def pair_config(pair: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config of ``pair`` (:data:`PAIR_OVERRIDES`, :data:`COMMON`, then the user's ``overrides``
    that apply to it: :func:`pair_overrides`)."""
    if pair not in PAIRS:
        raise ConfigError(f"unknown parity pair {pair!r}; available: {', '.join(PAIRS)}")
    return compose_train_config([*PAIR_OVERRIDES[pair], *COMMON, *pair_overrides(pair, overrides)])


def train_model(model: nn.Module, cfg: DictConfig, dataset, minutes: float | None = None) -> dict:
    """Train ``model`` (detkit's interface) on ``dataset`` with ``cfg``'s loader, optimizer, lr schedule and
    gradient clipping for ``cfg.trainer.epochs`` epochs, or, with ``minutes``, until that wall time is spent
    (the schedule re-planned after each step to end with it). Non-finite losses skip their step. Returns the
    totals: ``steps``, ``images``, ``epochs``, ``train_seconds``, ``skipped`` and ``pixel_sum`` (of every
    training image, to check that two runs saw the same batches)."""
    loader = build_data_loader(dataset, cfg.data, train=True, seed=cfg.seed)
    optimizer, scheduler = build_optimization(cfg, model, len(loader))
    schedule = scheduler.lr_lambdas[0]
    planned = cfg.trainer.epochs * len(loader)
    clip = cfg.trainer.grad_clip_norm
    totals = {"steps": 0, "images": 0, "skipped": 0, "pixel_sum": 0.0}
    model.train()
    start = time.perf_counter()

    def done() -> bool:
        return time.perf_counter() - start >= minutes * 60 if minutes else totals["steps"] >= planned

    epoch = 0
    while not done():
        for part in (loader.sampler, loader.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        for images, targets in loader:
            if done():
                break
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            else:
                totals["skipped"] += 1
            scheduler.step()
            totals["steps"] += 1
            totals["images"] += len(images)
            totals["pixel_sum"] += float(torch.stack(list(images)).double().sum())
            if minutes:
                elapsed = time.perf_counter() - start
                schedule.total_steps = max(totals["steps"] + 1, round(totals["steps"] * minutes * 60 / elapsed))
        epoch += 1
    return {**totals, "epochs": totals["steps"] / len(loader), "train_seconds": time.perf_counter() - start}


def score(model: nn.Module, cfg: DictConfig, dataset) -> dict:
    """AP and AP50 of ``model`` on ``dataset`` (the val split letterboxed to the evaluation size), by detkit's
    prediction and pycocotools evaluation."""
    loader = build_data_loader(dataset, cfg.data, train=False)
    metrics = evaluate_dataset(dataset, predict(model, loader), "coco", cfg.eval.backend)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"]}


def run_pair(pair: str, overrides: Sequence[str] = (), minutes: float | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Train and score detkit's and torchvision's detector of ``pair``, one after the other, each initialised
    after seeding with ``cfg.seed``: one row of the table."""
    cfg = pair_config(pair, overrides)
    with in_repository(), torch_threads(cfg.trainer.threads):
        prepare_data(cfg.data)
        train_set = build_dataset(cfg.data, "train", seed=cfg.seed)
        val_set = build_dataset(cfg.data, "val", train=False)
        num_classes = train_set.num_classes
        seed_everything(cfg.seed)
        ours = build_model(cfg.model, num_classes)
        seed_everything(cfg.seed)
        theirs = torchvision_model(pair, cfg, num_classes, ours)
        name = TORCHVISION_NAMES[pair].format(depth=cfg.model.backbone.get("depth", ""))
        sides = {}
        budget = f"{minutes:g} min" if minutes else f"{cfg.trainer.epochs} epochs"
        for side, model in (("detkit", ours), ("torchvision", theirs)):
            log(f"{pair}: training {side} ({budget})")
            seed_everything(cfg.seed)
            totals = train_model(model, cfg, train_set, minutes)
            sides[side] = {"name": f"detkit {cfg.model._target_.rsplit('.', 1)[-1]}" if side == "detkit" else
                           f"torchvision {name}", "params": sum(p.numel() for p in model.parameters()),
                           **totals, **score(model, cfg, val_set)}
    return {"pair": pair, "img_size": int(cfg.data.img_size), "batch_size": int(cfg.data.batch_size),
            "optim": OmegaConf.to_container(cfg.optim), "schedule": cfg.schedule._target_.rsplit(".", 1)[-1],
            **sides, "AP_ratio": ap_ratio(sides["detkit"]["AP"], sides["torchvision"]["AP"]),
            "AP50_ratio": ap_ratio(sides["detkit"]["AP50"], sides["torchvision"]["AP50"])}


def run_parity(out_dir: str | Path, pairs: Sequence[str] = PAIRS, overrides: Sequence[str] = (),
               minutes: float | None = None, epochs: int | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Every pair of ``pairs`` for ``epochs`` (None: the config's ``trainer.epochs``) or ``minutes`` per side;
    writes ``parity.json`` and ``parity.md`` into ``out_dir`` after each pair and returns the JSON."""
    if minutes is not None and epochs is not None:
        raise ConfigError("give --minutes or --epochs, not both")
    overrides = [*overrides, *([f"trainer.epochs={epochs}"] if epochs else [])]
    for pair in pairs:
        pair_config(pair, overrides)  # a bad pair or override fails before any training
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"minutes": minutes, "epochs": epochs, "overrides": list(overrides), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "rows": []}
    for pair in pairs:
        result["rows"].append(run_pair(pair, overrides, minutes, log))
        write_json(result, out_dir / "parity.json")
        (out_dir / "parity.md").write_text(format_parity(result))
    return result


def format_parity(result: dict) -> str:
    """The markdown table of :func:`run_parity`'s JSON: per pair both sides' AP, AP50 and detkit / torchvision."""
    budget = f"{result['minutes']:g} min per side" if result["minutes"] else \
        f"{result['epochs']} epochs" if result["epochs"] else "the config's epochs"
    lines = [f"training parity with torchvision: {budget}, same batches, optimizer and lr schedule; AP and AP50 by "
             f"pycocotools on the val split (torch {result['torch']}, {result['threads']} threads)", "",
             "| pair | detkit | torchvision | detkit AP | torchvision AP | AP ratio | detkit AP50 | torchvision AP50 "
             "| AP50 ratio | steps | images | epochs | params (M) detkit / torchvision |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ours, theirs = r["detkit"], r["torchvision"]
        steps = str(ours["steps"]) if ours["steps"] == theirs["steps"] else f"{ours['steps']} / {theirs['steps']}"
        images = str(ours["images"]) if ours["images"] == theirs["images"] else f"{ours['images']} / {theirs['images']}"
        lines.append(f"| {r['pair']} | {ours['name']} | {theirs['name']} | {ours['AP']:.4f} | {theirs['AP']:.4f} | "
                     f"{r['AP_ratio']} | {ours['AP50']:.4f} | {theirs['AP50']:.4f} | {r['AP50_ratio']} | {steps} | "
                     f"{images} | {ours['epochs']:.2f} / {theirs['epochs']:.2f} | "
                     f"{ours['params'] / 1e6:.2f} / {theirs['params'] / 1e6:.2f} |")
    return "\n".join(lines) + "\n"
