"""Pre-train a detector's backbone as a classifier of object crops, then start detection training from it.

The YOLOv1 paper pre-trains its first 20 convolutions as an ImageNet classifier (average pooling and a linear
layer on top) before adding the detection layers; YOLOv2 does the same with Darknet-19. With no download
allowed, :func:`pretrain_backbone` runs that stage on the detection data itself
(:class:`~detkit.data.crops.ObjectCrops`: a crop around every object, labelled with its class, and background
crops) and writes ``backbone.pt``; ``python tools/train.py backbone_weights=PATH`` loads it into
``model.backbone`` (:func:`load_backbone_weights`) and trains the rest from random init.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from detkit.app.build import build_model, prepare_data, raw_dataset, seed_everything
from detkit.data.crops import ObjectCrops
from detkit.data.loader import ResumableSampler
from detkit.engine.amp import AMPTrainer
from detkit.engine.checkpoint import load_torch_file, save_checkpoint
from detkit.engine.hooks import Hook, ScheduleHook
from detkit.engine.optim import adamw, build_scheduler
from detkit.engine.trainer import model_to
from detkit.errors import CheckpointError, ConfigError


class BackboneClassifier(nn.Module):
    """``backbone`` (its deepest output when it returns several), global average pooling and a linear layer."""

    def __init__(self, backbone: nn.Module, num_outputs: int, size: int) -> None:
        super().__init__()
        self.backbone = backbone
        was_training = backbone.training
        backbone.eval()  # the probe must not touch BatchNorm statistics
        with torch.no_grad():
            channels = self.features(torch.zeros(1, 3, size, size)).shape[1]
        backbone.train(was_training)
        self.fc = nn.Linear(channels, num_outputs)

    def features(self, images: Tensor) -> Tensor:
        out = self.backbone(images)
        if isinstance(out, dict):
            out = list(out.values())
        return out[-1] if isinstance(out, (list, tuple)) else out

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.features(images).float().mean(dim=(2, 3)))


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a :func:`pretrain_backbone` file into ``model.backbone``; a file for another backbone (other
    model settings) is a clear error naming the file and the first mismatches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no such file {path}")
    state = load_torch_file(path, "backbone file")
    if not isinstance(state, dict) or "backbone" not in state:
        raise CheckpointError(f"{path} is not a backbone file written by tools/pretrain.py (no 'backbone' entry)")
    if not hasattr(model, "backbone"):
        raise ValueError(f"{type(model).__name__} has no .backbone to load {path} into")
    source, own = state["backbone"], model.backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(source)), sorted(set(source) - set(own))
    shapes = [f"{k} {tuple(source[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in source and source[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{path} does not fit this {type(model).__name__}'s backbone (pre-trained with model "
            f"{state.get('model_target', '?')}): {len(missing)} missing entries {missing[:3]}, {len(unexpected)} "
            f"unexpected {unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]}; pre-train it with the same "
            "model.* settings"
        )
    model.backbone.load_state_dict(source)


class CropClassifier(nn.Module):
    """:class:`BackboneClassifier` in the trainer's interface: ``model(images, labels)`` → ``{"loss_cls"}``
    (cross-entropy in float32); the step's correct predictions are kept in ``correct`` for the log."""

    def __init__(self, classifier: BackboneClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.correct = torch.zeros(())

    def forward(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.classifier(images)
        self.correct = (logits.argmax(1) == labels).sum().detach()
        return {"loss_cls": F.cross_entropy(logits.float(), labels)}


def crop_accuracy(model: nn.Module, loader, dtype, device: torch.device) -> float:
    """Fraction of ``loader``'s crops ``model`` (a :class:`BackboneClassifier`) classifies right."""
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    model.train()
    return correct / max(total, 1)


class CropAccuracyHook(Hook):
    """Per epoch: mean loss, training and validation crop accuracy and speed, logged and kept in ``history``."""

    def __init__(self, model: CropClassifier, val_loader, log=print) -> None:
        self.model, self.val_loader, self.log = model, val_loader, log
        self.history: list[dict] = []

    def before_epoch(self, trainer) -> None:
        self.start, self.seen, self.loss_sum, self.correct = time.perf_counter(), 0, 0.0, 0

    def after_step(self, trainer) -> None:
        n = trainer.state.batch_size
        self.seen += n
        self.loss_sum += trainer.state.losses["loss"] * n
        self.correct += int(self.model.correct)  # one sync per step; fine at these sizes

    def after_epoch(self, trainer) -> None:
        seconds = time.perf_counter() - self.start
        val = crop_accuracy(self.model.classifier, self.val_loader, trainer.autocast_dtype, trainer.device)
        row = {"epoch": trainer.state.epoch + 1, "loss": self.loss_sum / max(self.seen, 1),
               "train_accuracy": self.correct / max(self.seen, 1), "val_accuracy": val,
               "img_s": self.seen / max(seconds, 1e-9)}
        self.history.append(row)
        self.log(f"epoch {row['epoch']}/{trainer.state.epochs}: loss={row['loss']:.4f} train acc="
                 f"{row['train_accuracy']:.4f} val acc={row['val_accuracy']:.4f} {row['img_s']:.1f} img/s "
                 f"{seconds:.0f}s")


def pretrain_backbone(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Train ``cfg.model``'s backbone on crops of ``cfg.data`` (``cfg.pretrain`` settings) with the
    training loop (:class:`~detkit.engine.amp.AMPTrainer`); writes ``backbone.pt`` (atomically) and
    ``pretrain.json`` into ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = cfg.pretrain
    if p.threads:
        torch.set_num_threads(int(p.threads))
    prepare_data(cfg.data)
    seed_everything(cfg.seed)
    train_raw, val_raw = raw_dataset(cfg.data, "train"), raw_dataset(cfg.data, "val")
    crops = dict(size=int(p.size), context=tuple(p.context), jitter=float(p.jitter), background=float(p.background))
    train_set = ObjectCrops(train_raw, seed=cfg.seed, train=True, **crops)
    val_set = ObjectCrops(val_raw, seed=cfg.seed, train=False, **crops)
    classes = train_raw.num_classes
    classifier = BackboneClassifier(build_model(cfg.model, classes).backbone, classes + 1, int(p.size))
    device = torch.device(cfg.device)
    model = model_to(CropClassifier(classifier), device, bool(p.channels_last))
    sampler = ResumableSampler(len(train_set), cfg.seed, shuffle=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=int(p.batch_size), sampler=sampler, drop_last=True,
                                         num_workers=int(p.num_workers))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=int(p.batch_size) * 2)
    # the trainer's AdamW (no decay on norms and biases) and warmup + cosine schedule, over 5% warmup steps
    optimizer = adamw(model, float(p.lr), float(p.weight_decay), momentum=0.9)
    total = max(1, int(p.epochs) * len(loader))
    scheduler = build_scheduler(optimizer, total, max(1, round(0.05 * total)), final_factor=0.05)
    log = CropAccuracyHook(model, val_loader)
    trainer = AMPTrainer(model, optimizer, loader, int(p.epochs), [ScheduleHook(scheduler), log], device=device,
                         channels_last=bool(p.channels_last), precision=str(p.precision))
    print(f"pre-training {type(classifier.backbone).__name__} of {cfg.model._target_} on {len(train_set)} crops "
          f"({classes} classes + background) at {p.size} px, {p.epochs} epochs, {trainer.precision}; "
          f"val {len(val_set)} crops")
    trainer.train()
    history = log.history
    backbone = classifier.backbone.to("cpu", memory_format=torch.contiguous_format)
    state = {"backbone": backbone.state_dict(),
             "model_target": str(cfg.model._target_),
             "model": OmegaConf.to_container(cfg.model, resolve=True), "class_names": list(train_raw.class_names),
             "size": int(p.size), "val_accuracy": history[-1]["val_accuracy"] if history else None}
    save_checkpoint(state, out_dir / "backbone.pt")
    summary = {"backbone": str(out_dir / "backbone.pt"), "history": history, "crops": len(train_set)}
    (out_dir / "pretrain.json").write_text(json.dumps(summary, indent=1))
    print(f"written {out_dir / 'backbone.pt'} (val accuracy {summary['history'][-1]['val_accuracy']:.4f}); "
          f"train with: python tools/train.py backbone_weights={out_dir / 'backbone.pt'}"
          if history else f"written {out_dir / 'backbone.pt'}")
    return summary
