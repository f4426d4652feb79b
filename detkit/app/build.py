"""Build datasets, loaders, model, optimizer and schedule from a Hydra config."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from detkit.app.recipe import detector_config
from detkit.data.augment import build_train_transform
from detkit.data.loader import build_loader
from detkit.data.mosaic import Mosaic
from detkit.data.multiscale import MultiScaleDataset, MultiScaleSampler
from detkit.data.proposals import WithProposals
from detkit.data.transforms import Letterbox
from detkit.data.validation import DatasetError
from detkit.engine import distributed
from detkit.engine.optim import build_scheduler
from detkit.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model initialisation); data randomness has its own per-sample seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(data_cfg: DictConfig) -> None:
    """Generate a synthetic dataset on first use: the built-in one from ``data.builtin`` (the options of
    :func:`~detkit.data.builtin.ensure_builtin`), any other from ``data.generate`` (a ``_target_`` that
    generates into a folder unless it is complete, e.g. :func:`~detkit.data.suite.ensure_suite`, and its
    arguments). A no-op for user datasets, where both are null or absent."""
    builtin = data_cfg.builtin
    if builtin:
        from detkit.data.builtin import ensure_builtin

        ensure_builtin(**builtin)
    generate = data_cfg.get("generate")
    if generate:
        instantiate(generate)


_UNSIZED = ("data.img_size is null: training chooses it from the data (auto.sizes; detkit.app.auto.fill_sizes "
            "outside training); set data.img_size=N to choose it")


def eval_img_size(data_cfg: DictConfig) -> int:
    """The square size images are letterboxed to for evaluation and inference: ``data.test_size``, or the
    training size ``data.img_size`` when it is unset (null)."""
    size = data_cfg.test_size or data_cfg.img_size
    if size is None:
        raise ConfigError(_UNSIZED)
    return int(size)


def eval_letterbox(data_cfg: DictConfig, size: int | None = None) -> Letterbox:
    """The evaluation/inference transform: to ``size`` or :func:`eval_img_size` in the ``data.resize`` mode
    (letterbox when the config has none; ``data.max_size`` for shorter_side), filled with ``data.pad_value``
    (detkit's 114 when the config has none)."""
    return Letterbox(size or eval_img_size(data_cfg), data_cfg.get("pad_value"), data_cfg.get("resize") or "letterbox",
                     data_cfg.get("max_size"))


def raw_dataset(data_cfg: DictConfig, split: str, transforms=None, with_extra: bool = True):
    """The reader of ``data.<split>`` with ``transforms`` (None: it serves untransformed samples); a bad
    dataset raises the reader's own error, not Hydra's wrapper around it. The train split is followed by the
    COCO sets of ``data.extra_train`` (e.g. Data Distillation's pseudo-labels) unless ``with_extra`` is False:
    a :class:`~detkit.data.concat.ConcatDetection` whose parts share the training set's categories; then by
    the classification sets of ``data.classification_train`` (images with ``image_label``, no boxes: YOLO9000's
    joint training)."""
    extra = list(data_cfg.get("extra_train") or []) if split == "train" and with_extra else []
    classification = list(data_cfg.get("classification_train") or []) if split == "train" and with_extra else []
    try:
        dataset = instantiate(data_cfg[split], transforms=None if extra or classification else transforms)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (DatasetError, FileNotFoundError)):
            raise exc.__cause__ from None
        raise
    if extra or classification:
        from detkit.data.concat import with_extra_sets

        dataset = with_extra_sets(dataset, extra, data_cfg.get("on_invalid", "error"), transforms, classification)
    return dataset


def build_dataset(data_cfg: DictConfig, split: str, seed: int = 0, train: bool | None = None):
    """The ``split`` dataset (``data.<split>`` config) with training transforms at ``data.img_size`` or the
    evaluation letterbox at :func:`eval_img_size`; wrapped in :class:`WithProposals` when
    ``data.proposals_file`` is set; a training set is wrapped in :class:`Mosaic` when ``data.mosaic.prob > 0``
    and in :class:`MultiScaleDataset` when ``data.multiscale.sizes`` is not empty."""
    train = split == "train" if train is None else train
    size = data_cfg.img_size
    if train and size is None:  # evaluation letterboxes to eval_img_size, which checks its own
        raise ConfigError(_UNSIZED)
    transforms = build_train_transform(data_cfg.augment, size, seed) if train else eval_letterbox(data_cfg)
    use_mosaic = train and data_cfg.mosaic.prob > 0
    dataset = raw_dataset(data_cfg, split, transforms=None if use_mosaic else transforms)
    if data_cfg.get("proposals_file"):
        if train and data_cfg.get("extra_train"):  # proposals are found by image id, which parts may share
            raise ConfigError("data.proposals_file cannot be combined with data.extra_train")
        if train and data_cfg.get("classification_train"):
            raise ConfigError("data.classification_train cannot be combined with data.proposals_file: a "
                              "classification image has no proposals")
        if use_mosaic:
            raise ValueError("data.proposals_file needs data.mosaic.prob=0: a mosaic of four images has no proposals")
        dataset = WithProposals(dataset, data_cfg.proposals_file)
    if use_mosaic:
        inner = build_train_transform(data_cfg.augment, size, seed, geometric=False)
        dataset = Mosaic(dataset, inner, size, seed, plain_transforms=transforms, **data_cfg.mosaic)
    if train and _multiscale_sizes(data_cfg):
        dataset = MultiScaleDataset(dataset)
    return dataset


def _multiscale_sizes(data_cfg: DictConfig) -> list[int]:
    return list(data_cfg.multiscale.sizes)


def build_data_loader(dataset, data_cfg: DictConfig, train: bool, seed: int = 0):
    """Training loaders are sharded over the data-parallel processes of :func:`distributed.current`."""
    batch = data_cfg.batch_size if train else data_cfg.eval_batch_size
    world = distributed.current()
    sampler = None
    if train and _multiscale_sizes(data_cfg):
        sampler = MultiScaleSampler(len(dataset), batch, _multiscale_sizes(data_cfg), data_cfg.multiscale.every, seed,
                                    rank=world.rank, world=world.size)
    return build_loader(dataset, batch, train=train, seed=seed, num_workers=data_cfg.num_workers, sampler=sampler,
                        rank=world.rank, world=world.size)


def build_model(model_cfg: DictConfig, num_classes: int, channel_spec: Mapping | None = None) -> nn.Module:
    """The detector ``model_cfg`` names; ``channel_spec`` (a pruned model's per-layer channel counts, stored in
    its config by ``tools/slim.py``) rebuilds the slim architecture, so pruned checkpoints load with
    ``weights_only=True`` like any other. ``model.bn_eps`` (optional) sets every BatchNorm's ε after building:
    converted weights keep the ε they were trained with (darknet 1e-5, torchvision's frozen BN 0); ``model.recipe``
    (:mod:`detkit.app.recipe`) is the training's, not the detector's."""
    bn_eps = model_cfg.get("bn_eps")
    model = instantiate(detector_config(model_cfg), num_classes=num_classes)
    if bn_eps is not None:
        from detkit.models.layers import set_bn_eps

        set_bn_eps(model, bn_eps)
    if channel_spec:
        from detkit.compression.channels import apply_channel_spec

        apply_channel_spec(model, channel_spec)
    return model


LR_SCALING = ("linear", "sqrt", "none")


def scaled_lr(lr: float, total_batch: int, reference_batch: int | None, rule: str = "linear") -> float:
    """The learning rate for ``total_batch`` images per optimizer step, given ``lr`` tuned for
    ``reference_batch``: times total/reference (``linear``, Goyal et al. 2017, for SGD), times its square root
    (``sqrt``, usual for Adam), or unchanged (``none``, or no reference)."""
    if rule not in LR_SCALING:
        raise ValueError(f"optim.lr_scaling must be one of {', '.join(LR_SCALING)}, got {rule!r}")
    if not reference_batch or rule == "none":
        return lr
    ratio = total_batch / reference_batch
    return lr * (ratio if rule == "linear" else ratio**0.5)


def build_optimization(cfg: DictConfig, model: nn.Module, steps_per_epoch: int, world_size: int = 1):
    """Optimizer (the ``optim`` config's ``_target_`` called with ``model``) and per-step scheduler (the
    ``schedule`` config's :class:`~detkit.engine.optim.LRSchedule`) for ``cfg.trainer.epochs`` epochs; the
    learning rate is scaled from ``optim.reference_batch`` to the total batch (per-process batch × ``world_size``,
    which counts processes times accumulated batches) by ``optim.lr_scaling``."""
    optim = dict(cfg.optim)
    reference, rule = optim.pop("reference_batch"), optim.pop("lr_scaling")
    total_batch = cfg.data.batch_size * world_size
    optim["lr"] = scaled_lr(optim["lr"], total_batch, reference, rule)
    if distributed.current().is_main and reference and optim["lr"] != cfg.optim.lr:
        print(f"lr {optim['lr']:.4g}: {cfg.optim.lr:.4g} tuned for a batch of {reference}, scaled ({rule}) to the "
              f"total batch {cfg.data.batch_size} x {world_size} (processes x accumulation) = {total_batch}")
    optimizer = instantiate(optim)(model)
    sched = dict(cfg.schedule)
    warmup_steps = sched.pop("warmup_steps")
    total = cfg.trainer.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total, min(warmup_steps, total), schedule=instantiate(sched))
    return optimizer, scheduler
