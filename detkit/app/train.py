"""The training application: build data, model, optimization and hooks from a config and run the Trainer."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.app.build import (
    build_data_loader,
    build_dataset,
    build_model,
    build_optimization,
    eval_img_size,
    prepare_data,
    seed_everything,
)
from detkit.app.evaluate import make_evaluator
from detkit.app.pretrain import load_backbone_weights
from detkit.compression.sparsity import sparsity_hook
from detkit.engine import distributed
from detkit.engine.budget import TimeBudgetHook
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.ema import EMAHook
from detkit.engine.hooks import CheckpointHook, EvalHook, PlotHook, ProgressHook, TensorBoardHook
from detkit.engine.trainer import Hook, Trainer
from detkit.evaluation.dataset import format_metrics, headline, main_metric
from detkit.utils.complexity import complexity


def train(cfg: DictConfig, out_dir: str | Path, extra_hooks: list[Hook] = ()) -> dict:
    """Train ``cfg`` into ``out_dir`` (checkpoints, TensorBoard, metrics, predictions); returns the final
    validation metrics. ``cfg.resume`` continues from a checkpoint exactly."""
    world, device = distributed.init_from_env(cfg.device)
    out_dir = Path(out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(cfg.trainer.threads)
    if world.is_main:  # one process generates the built-in data; the others wait for it
        prepare_data(cfg.data)
    distributed.barrier()
    started = time.perf_counter()  # a time budget counts from here: data generation is a one-time cost
    if cfg.trainer.get("deterministic"):
        # Deterministic kernels only (an op without one raises, naming itself); cuBLAS needs this workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    train_set = build_dataset(cfg.data, "train", cfg.seed)
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    train_loader = build_data_loader(train_set, cfg.data, train=True, seed=cfg.seed)
    val_loader = build_data_loader(val_set, cfg.data, train=False)
    model = build_model(cfg.model, train_set.num_classes, cfg.get("channel_spec"))
    if cfg.get("backbone_weights") and not cfg.get("resume"):
        load_backbone_weights(model, cfg.backbone_weights)
    if cfg.get("weights"):
        load_weights(model, cfg.weights)
    if cfg.trainer.get("sync_bn") and world.size > 1:
        if device.type != "cuda":
            raise ValueError("trainer.sync_bn=true needs CUDA devices: SyncBatchNorm has no CPU kernel (CPU/gloo "
                             "runs normalise each process's share of the batch on its own)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the whole batch
    accumulate = int(cfg.trainer.get("accumulate", 1))
    steps_per_epoch = train_loader.sampler.num_samples // (cfg.data.batch_size * accumulate)
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch, world.size * accumulate)
    say = print if world.is_main else (lambda *args, **kwargs: None)
    params = sum(p.numel() for p in model.parameters())
    say(f"model {type(model).__name__}: {params / 1e6:.2f}M parameters; train {len(train_set)} images, "
        f"val {len(val_set)} images, {train_set.num_classes} classes; output {out_dir}"
        + (f"; {world.size} processes x batch {cfg.data.batch_size}" if world.size > 1 else ""))
    if world.is_main:
        say(complexity(model, (1, 3, cfg.data.img_size, cfg.data.img_size)).format())
        if eval_img_size(cfg.data) != cfg.data.img_size:
            say(f"training at {cfg.data.img_size} px, evaluating at {eval_img_size(cfg.data)} px (data.test_size)")
    extra = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": list(train_set.class_names),
        "label_to_category_id": list(train_set.label_to_category_id),
    }
    eval_cfg = cfg.get("eval") or {}
    metric = eval_cfg.get("metric", "coco")
    hooks = list(extra_hooks) + sparsity_hook(cfg.get("sparsity"), out_dir if world.is_main else None)
    if world.is_main:  # logging, evaluation and checkpoints happen once, on rank 0
        evaluate = make_evaluator(val_set, val_loader, out_dir, device, metric,
                                  eval_cfg.get("backend", "pycocotools"))
        hooks = [
            ProgressHook(),
            EvalHook(evaluate, every=cfg.trainer.eval_every, key=main_metric(metric)),
            *([PlotHook(out_dir, train_set.class_names)] if eval_cfg.get("plots", True) else []),
            CheckpointHook(out_dir, extra, every_steps=cfg.trainer.checkpoint_every_steps),
            TensorBoardHook(out_dir / "tb", every=cfg.trainer.log_every),
            *hooks,
        ]
    if cfg.trainer.get("max_minutes"):  # in every process: they must agree on the plan
        # the first estimate of an evaluation's time counts val images at the training size's cost
        eval_images = round(len(val_set) * (eval_img_size(cfg.data) / cfg.data.img_size) ** 2)
        hooks.insert(0, TimeBudgetHook(cfg.trainer.max_minutes, started, eval_images, cfg.trainer.eval_every,
                                       log=say))
    if world.is_main and cfg.trainer.ema.enabled:
        hooks.insert(0, EMAHook(cfg.trainer.ema.decay, cfg.trainer.ema.tau))
    trainer = Trainer(model, optimizer, scheduler, train_loader, cfg.trainer.epochs, hooks, device,
                      cfg.trainer.grad_clip_norm, cfg.trainer.channels_last,
                      cfg.trainer.get("precision", "fp32"), cfg.trainer.get("max_nonfinite", 1), accumulate,
                      cfg.trainer.get("compile", False))
    say(f"precision {trainer.precision}" + (" (auto)" if cfg.trainer.get("precision") == "auto" else ""))
    if cfg.get("resume"):
        trainer.load_state_dict(load_checkpoint(cfg.resume))
        say(f"resumed from {cfg.resume} at epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}")
    start = time.perf_counter()
    trainer.train()
    if trainer.stop_requested or not world.is_main:
        return {}
    print(f"trained in {time.perf_counter() - start:.0f}s\n{format_metrics(trainer.metrics)}")
    print(headline(trainer.metrics))
    return trainer.metrics


def load_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Start from a checkpoint's weights (its EMA weights when it has them) with a fresh optimizer and schedule:
    fine-tuning, as opposed to ``resume``. The architectures must match exactly."""
    state = load_checkpoint(checkpoint)
    weights = state.get("weights", state.get("model"))
    if weights is None:
        raise ValueError(f"{checkpoint} holds no model weights (keys: {', '.join(state)})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise ValueError(f"the weights in {checkpoint} do not fit model {type(model).__name__} (a different "
                         f"model config or channel_spec?): {' '.join(line.strip() for line in first)}") from None
