"""Network Slimming end to end on a checkpoint (what ``tools/slim.py`` runs): prune, save a reloadable pruned
checkpoint, optionally fine-tune it with the normal trainer, and report size, speed and accuracy.

A pruned checkpoint is an ordinary detkit checkpoint whose stored config carries ``channel_spec``
(:mod:`detkit.compression.channels`), so ``tools/eval.py``, ``tools/predict.py``, ``tools/export.py`` and
``tools/train.py weights=...`` take it as they take any other.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.compression.graph import example_images, trace_size
from detkit.compression.pruning import PruningResult, prune_model
from detkit.engine.build import build_data_loader, build_dataset, prepare_data
from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.launch import load_trained, make_evaluator
from detkit.engine.launch import train as train_run
from detkit.utils.benchmark import median_ms
from detkit.utils.complexity import complexity

PRUNE_KEYS = ("ratio", "threshold", "min_channels", "max_layer_ratio", "round_to", "compensate")


def weights_megabytes(model: nn.Module) -> float:
    """Size in MB (10⁶ bytes) of ``model``'s serialised state dict: a checkpoint's weights."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


def cpu_latency_ms(model: nn.Module, img_size: int, repeats: int, threads: int | None = None) -> float:
    """Median CPU wall time (ms) of one eval-mode forward of a (1, 3, img_size, img_size) batch, NMS included.
    Meaningful only on an otherwise idle machine."""
    model = model.cpu().eval()
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return median_ms(lambda: model(images), repeats, warmup=3)
    finally:
        torch.set_num_threads(previous)


def describe(model: nn.Module, img_size: int, metrics: Mapping | None, latency_repeats: int,
             threads: int | None = None) -> dict:
    """One row of the report: params, GFLOPs at ``img_size``, weights MB, CPU batch-1 latency (None when
    ``latency_repeats`` is 0), AP and AP50 (None without ``metrics``)."""
    cost = complexity(model, (1, 3, img_size, img_size))
    metrics = metrics or {}
    return {
        "params": cost.params,
        "gflops": cost.flops / 1e9,
        "weights_mb": weights_megabytes(model),
        "latency_ms": cpu_latency_ms(model, img_size, latency_repeats, threads) if latency_repeats else None,
        "AP": metrics.get("AP", metrics.get("mAP")),
        "AP50": metrics.get("AP50", metrics.get("mAP")),
    }


def format_report(rows: Mapping[str, dict]) -> str:
    """Markdown table of :func:`describe` rows, with each row's ratio to the first in parameters, FLOPs and
    latency."""
    first = next(iter(rows.values()))

    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| model | params | GFLOPs | weights MB | CPU latency b1 (ms) | AP | AP50 | params ÷ | FLOPs ÷ "
             "| latency ÷ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        speedup = (first["latency_ms"] / r["latency_ms"]) if r["latency_ms"] and first["latency_ms"] else None
        lines.append(f"| {name} | {r['params'] / 1e6:.3f}M | {r['gflops']:.3f} | {r['weights_mb']:.2f} "
                     f"| {cell(r['latency_ms'], '.1f')} | {cell(r['AP'], '.4f')} | {cell(r['AP50'], '.4f')} "
                     f"| {first['params'] / r['params']:.2f}x | {first['gflops'] / max(r['gflops'], 1e-12):.2f}x "
                     f"| {cell(speedup, '.2f')}{'x' if speedup else ''} |")
    return "\n".join(lines)


def pruned_state(state: dict, model: nn.Module, cfg: DictConfig, result: PruningResult, prune: Mapping) -> dict:
    """A detkit checkpoint of the pruned ``model``: its config gets ``channel_spec`` (and no resume/weights),
    the original's class names and mapping are kept; ``pruning`` records what was done."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.channel_spec = result.channel_spec
    cfg.resume, cfg.weights = None, None
    weights = model.state_dict()
    return {
        "model": weights, "weights": weights,  # the same tensors: stored once
        "config": OmegaConf.to_container(cfg),
        "class_names": list(state["class_names"]),
        "label_to_category_id": list(state.get("label_to_category_id", [])),
        "pruning": {"settings": dict(prune), "prunable_channels": result.prunable, "removed_channels": result.removed,
                    "groups": [list(g) for g in result.groups], "skipped": [list(s) for s in result.skipped]},
    }


def finetune_config(pruned_cfg: Mapping, pruned_checkpoint: Path, epochs: int, overrides: Mapping | None = None,
                    device: str = "cpu") -> DictConfig:
    """The training config that fine-tunes a pruned checkpoint: its own config with ``weights`` = the pruned
    checkpoint, ``trainer.epochs`` = ``epochs``, ``device``, no ``sparsity`` penalty, then ``overrides``."""
    cfg = OmegaConf.create(dict(pruned_cfg))
    cfg.pop("sparsity", None)
    cfg.weights, cfg.resume, cfg.device = str(pruned_checkpoint), None, device
    cfg.trainer.epochs = int(epochs)
    return OmegaConf.merge(cfg, OmegaConf.create(dict(overrides or {})))


def slim_checkpoint(checkpoint: str | Path, out_dir: str | Path, prune: Mapping, finetune: Mapping | None = None,
                    report: Mapping | None = None, device: str = "cpu") -> dict:
    """Prune ``checkpoint`` (``prune``: :func:`~detkit.compression.pruning.prune_model` arguments) into
    ``out_dir/pruned.pt``, evaluate before and after, fine-tune ``finetune.epochs`` epochs (0: none) into
    ``out_dir/finetune/``, and write ``report.md`` / ``report.json``; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(prune) - set(PRUNE_KEYS)
    if unknown:
        raise ValueError(f"unknown prune setting(s) {sorted(unknown)}; expected some of {', '.join(PRUNE_KEYS)}")
    finetune, report = dict(finetune or {}), dict(report or {})
    repeats, threads = int(report.get("latency_repeats", 0)), report.get("threads")
    model, cfg, state = load_trained(checkpoint, device)
    prepare_data(cfg.data)
    dataset = build_dataset(cfg.data, "val", train=False)
    loader = build_data_loader(dataset, cfg.data, train=False)
    metric = (cfg.get("eval") or {}).get("metric", "coco")
    backend = (cfg.get("eval") or {}).get("backend", "pycocotools")

    def evaluate(net: nn.Module, name: str) -> dict:
        (out_dir / name).mkdir(exist_ok=True)
        return make_evaluator(dataset, loader, out_dir / name, device, metric, backend)(net.to(device).eval())

    size = int(cfg.data.img_size)
    rows = {"unpruned": describe(model, size, evaluate(model, "unpruned"), repeats, threads)}
    result = prune_model(model, images=example_images(trace_size(model)).to(device), **prune)
    rows["pruned"] = describe(model, size, evaluate(model, "pruned"), repeats, threads)
    pruned = pruned_state(state, model, cfg, result, prune)
    pruned_path = save_checkpoint(pruned, out_dir / "pruned.pt")
    # The pruned model's training config, for tools/train.py: --config-dir OUT --config-name pruned weights=...
    OmegaConf.save(OmegaConf.create(pruned["config"]), out_dir / "pruned.yaml")
    print(f"pruned {result.removed} of {result.prunable} prunable channels ({result.removed_fraction:.1%}) "
          f"-> {pruned_path}; fine-tune it with: python tools/train.py --config-dir {out_dir} --config-name pruned "
          f"weights={pruned_path}")
    if int(finetune.get("epochs", 0)) > 0:
        ft_cfg = finetune_config(pruned["config"], pruned_path, finetune["epochs"], finetune.get("overrides"), device)
        (out_dir / "finetune").mkdir(exist_ok=True)
        OmegaConf.save(ft_cfg, out_dir / "finetune" / "config.yaml")  # resume: --config-name config resume=...
        metrics = train_run(ft_cfg, out_dir / "finetune")
        tuned, _, _ = load_trained(out_dir / "finetune" / "last.pt", device)
        rows["fine-tuned"] = describe(tuned, size, metrics, repeats, threads)
    summary = {
        "checkpoint": str(checkpoint), "pruned_checkpoint": str(pruned_path), "prune": dict(prune),
        "finetune_epochs": int(finetune.get("epochs", 0)), "prunable_channels": result.prunable,
        "removed_channels": result.removed, "removed_fraction": result.removed_fraction,
        "skipped_groups": [list(s) for s in result.skipped], "channel_spec": result.channel_spec, "rows": rows,
    }
    table = format_report(rows)
    (out_dir / "report.md").write_text(
        f"# Network Slimming of {checkpoint}\n\nprune {dict(prune)}; removed {result.removed} of {result.prunable} "
        f"prunable channels ({result.removed_fraction:.1%}); fine-tune {summary['finetune_epochs']} epochs; "
        f"input {size} px; latency: median of {repeats} CPU batch-1 forwards (NMS included)"
        f"{f', {threads} threads' if threads else ''}\n\n{table}\n")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1))
    print(table)
    return summary
