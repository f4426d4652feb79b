"""The training application: build data, model, optimization and hooks from a config and run the trainer."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detkit.app.auto import apply_auto
from detkit.app.build import (
    build_data_loader,
    build_dataset,
    build_model,
    build_optimization,
    eval_img_size,
    prepare_data,
    raw_dataset,
    seed_everything,
)
from detkit.app.errors import check_input_size
from detkit.app.evaluate import make_eval_probe, make_evaluator
from detkit.app.pretrain import load_backbone_weights
from detkit.app.recipe import apply_recipe
from detkit.compression.sparsity import sparsity_hook
from detkit.data.mosaic import Mosaic
from detkit.engine import distributed
from detkit.engine.amp import AMPTrainer
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.hooks import Hook
from detkit.engine.trainer import model_to
from detkit.errors import CheckpointError, ConfigError
from detkit.evaluation.dataset import format_metrics, headline, main_metric
from detkit.utils.complexity import complexity


def build_hooks(hooks_cfg: Mapping, run: Mapping, main_process: bool = True) -> list[Hook]:
    """The hooks a ``hooks`` config names: each entry is instantiated from its ``_target_``; a partial (an
    entry with ``_partial_: true``) is then called with the objects of ``run`` its constructor names. The
    entry's name becomes the hook's ``name`` (its key in checkpoints); null entries are left out, and so are
    ``main_process_only`` hooks when ``main_process`` is False."""
    hooks = []
    for name, entry in hooks_cfg.items():
        if entry is None:
            continue
        hook = instantiate(entry)
        if callable(hook) and not isinstance(hook, Hook):  # a partial: the run supplies what it needs
            wanted = inspect.signature(hook.func).parameters
            hook = hook(**{k: v for k, v in run.items() if k in wanted and k not in hook.keywords})
        if not isinstance(hook, Hook):
            raise TypeError(f"hooks.{name}: {entry['_target_']} built a {type(hook).__name__}, not a Hook")
        if hook.main_process_only and not main_process:
            continue
        hook.name = str(name)
        hooks.append(hook)
    return hooks


@contextlib.contextmanager
def out_of_memory_hint(batch_size: int, img_size: int, accumulate: int, device: torch.device):
    """Turns an out-of-memory error of training into one that says what to change."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as error:
        text = str(error)
        if not isinstance(error, torch.OutOfMemoryError) and "out of memory" not in text \
                and "can't allocate memory" not in text:
            raise
        raise MemoryError(
            f"out of memory in a training step on {device} with a batch of {batch_size} images of "
            f"{img_size}x{img_size}: lower data.batch_size (e.g. data.batch_size={max(batch_size // 2, 1)}) and "
            f"raise trainer.accumulate (now {accumulate}) to keep the same images per optimizer step, or lower "
            f"data.img_size ({text.splitlines()[0][:200]})") from None


def training_forward(model: nn.Module, device: torch.device, compile: bool | str) -> nn.Module:
    """The module the training forward pass runs through: ``model`` wrapped in DistributedDataParallel in a
    data-parallel run, then ``torch.compile``d when asked (True, or a backend name)."""
    forward = model
    if distributed.current().size > 1:
        forward = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    if compile:
        forward = torch.compile(forward, **({"backend": compile} if isinstance(compile, str) else {}))
    return forward


def find_mosaic(dataset) -> Mosaic | None:
    """The :class:`Mosaic` stage of a training dataset (possibly inside a multi-scale wrapper), or None."""
    while dataset is not None and not isinstance(dataset, Mosaic):
        dataset = vars(dataset).get("dataset")  # (a wrapper's own attribute, not one it forwards)
    return dataset


def stored_config(cfg: DictConfig) -> dict:
    """The config a checkpoint keeps: resolved, except the hook list, whose entries keep their references to
    ``trainer.*`` so a run started from the checkpoint (fine-tuning, compression) follows its own settings."""
    config = OmegaConf.to_container(cfg, resolve=True)
    if "hooks" in cfg:
        config["hooks"] = OmegaConf.to_container(cfg.hooks, resolve=False)
    return config


def train(cfg: DictConfig, out_dir: str | Path, extra_hooks: Iterable[Hook] = ()) -> dict:
    """Train ``cfg`` into ``out_dir`` (checkpoints, TensorBoard, metrics, predictions); returns the final
    validation metrics. ``cfg.resume`` continues from a checkpoint exactly. ``extra_hooks`` join the hooks
    ``cfg.hooks`` names (compression uses them)."""
    world, device = distributed.init_from_env(cfg.device)
    # checkpoints are read before anything is built, so a bad file is reported at once
    resumed = load_checkpoint(cfg.resume) if cfg.resume else None
    start_weights = load_checkpoint(cfg.weights) if cfg.weights else None
    eps = ((start_weights or {}).get("config") or {}).get("model", {}).get("bn_eps")
    if eps is not None and cfg.model.get("bn_eps") is None:  # converted weights keep the ε they were trained with
        with open_dict(cfg.model):
            cfg.model.bn_eps = eps
    out_dir = Path(out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if world.is_main:  # one process generates the built-in data; the others wait for it
        prepare_data(cfg.data)
    distributed.barrier()
    started = time.perf_counter()  # a time budget counts from here: data generation is a one-time cost
    if cfg.trainer.deterministic:
        # Deterministic kernels only (an op without one raises, naming itself); cuBLAS needs this workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # the model's own optimizer and schedule values (model.recipe), unless the run names them
    apply_recipe(cfg, print if world.is_main else lambda text: None)
    # sizes the datasets are built at and priors the model is built with, chosen from the data (cfg.auto)
    apply_auto(cfg, lambda: raw_dataset(cfg.data, "train"), print if world.is_main else lambda text: None)
    seed_everything(cfg.seed)
    train_set = build_dataset(cfg.data, "train", cfg.seed)
    val_set = build_dataset(cfg.data, "val", cfg.seed)
    train_loader = build_data_loader(train_set, cfg.data, train=True, seed=cfg.seed)
    val_loader = build_data_loader(val_set, cfg.data, train=False)
    model = build_model(cfg.model, train_set.num_classes, cfg.channel_spec)
    if cfg.backbone_weights and not cfg.resume:
        load_backbone_weights(model, cfg.backbone_weights)
    check_input_size(model, cfg.data.img_size, "data.img_size")
    check_input_size(model, eval_img_size(cfg.data), "data.test_size")
    for size in cfg.data.multiscale.sizes or []:
        check_input_size(model, size, "data.multiscale.sizes")
    if start_weights is not None:
        load_weights(model, start_weights, cfg.weights)
    if cfg.trainer.sync_bn and world.size > 1:
        if device.type != "cuda":
            raise ValueError("trainer.sync_bn=true needs CUDA devices: SyncBatchNorm has no CPU kernel (CPU/gloo "
                             "runs normalise each process's share of the batch on its own)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # BatchNorm statistics over the whole batch
    accumulate = int(cfg.trainer.accumulate)
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
    metric = cfg.eval.metric
    run = {
        "scheduler": scheduler,
        "evaluate": make_evaluator(val_set, val_loader, out_dir, device, metric, cfg.eval.backend),
        "key": main_metric(metric),
        "out_dir": out_dir,
        "log_dir": out_dir / "tb",
        "extra": {"config": stored_config(cfg), "class_names": list(train_set.class_names),
                  "label_to_category_id": list(train_set.label_to_category_id)},
        "class_names": list(train_set.class_names),
        "mosaic": find_mosaic(train_set),
        "started": started,
        # an evaluation's time before one is measured: val images at the training size's cost, or (the budget's
        # eval_probe) timed on a few of them
        "eval_images": round(len(val_set) * (eval_img_size(cfg.data) / cfg.data.img_size) ** 2),
        "eval_probe": make_eval_probe(val_loader, len(val_set), device),
        "log": say,
    }
    hooks = build_hooks(cfg.hooks, run, world.is_main) + list(extra_hooks)
    hooks += sparsity_hook(cfg.sparsity, out_dir if world.is_main else None)
    model_to(model, device, cfg.trainer.channels_last)
    trainer = AMPTrainer(model, optimizer, train_loader, cfg.trainer.epochs, hooks, device=device,
                         accumulate=accumulate, channels_last=cfg.trainer.channels_last,
                         forward=training_forward(model, device, cfg.trainer.compile),
                         precision=cfg.trainer.precision)
    say(f"precision {trainer.precision}" + (" (auto)" if cfg.trainer.precision == "auto" else ""))
    if resumed is not None:
        trainer.load_state_dict(resumed)
        say(f"resumed from {cfg.resume} at epoch {trainer.state.epoch + 1}, step {trainer.state.step_in_epoch}")
    start = time.perf_counter()
    with out_of_memory_hint(cfg.data.batch_size, cfg.data.img_size, accumulate, device):
        trainer.train()
    state = trainer.state
    if state.stop_requested or not world.is_main:
        return {}
    print(f"trained in {time.perf_counter() - start:.0f}s\n{format_metrics(state.metrics)}")
    print(headline(state.metrics))
    return state.metrics


def load_weights(model: nn.Module, state: dict, checkpoint: str | Path) -> None:
    """Start from a checkpoint's weights (its EMA weights when it has them; ``state`` is the checkpoint read
    from ``checkpoint``) with a fresh optimizer and schedule: fine-tuning, as opposed to ``resume``. The
    architectures must match, except the class outputs when the checkpoint has another class count
    (:func:`~detkit.app.finetune.adapt_class_outputs`)."""
    weights = state.get("weights", state.get("model"))
    if weights is None:
        raise CheckpointError(f"{checkpoint} holds no model weights (keys: {', '.join(state)})")
    old_classes = len(state.get("class_names") or ())
    if old_classes and old_classes != getattr(model, "num_classes", old_classes):
        from detkit.app.finetune import adapt_class_outputs, describe

        weights, reset = adapt_class_outputs(model, weights, old_classes)
        if distributed.current().is_main:
            print(describe(reset, old_classes, model.num_classes, checkpoint))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1:3]
        raise ConfigError(f"the weights in {checkpoint} do not fit model {type(model).__name__} (a different "
                         f"model config or channel_spec?): {' '.join(line.strip() for line in first)}") from None
