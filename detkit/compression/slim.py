"""Network Slimming end to end on a checkpoint (what ``tools/slim.py method=slim`` runs): prune, save a reloadable
pruned checkpoint, optionally fine-tune it with the normal trainer, and report size, speed and accuracy. The
channels are ranked by BatchNorm |γ| or by another criterion of :mod:`detkit.compression.criteria` (``l1``,
``taylor``, ``apoz``), in one round or iteratively (prune a fraction, fine-tune, repeat).

A pruned checkpoint is an ordinary detkit checkpoint whose stored config carries ``channel_spec``
(:mod:`detkit.compression.channels`), so ``tools/eval.py``, ``tools/predict.py``, ``tools/export.py`` and
``tools/train.py weights=...`` take it as they take any other.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from detkit.app.build import build_data_loader, build_dataset, eval_img_size, prepare_data
from detkit.app.evaluate import load_trained, make_evaluator
from detkit.app.train import train as train_run
from detkit.compression.criteria import CRITERIA, criterion_scores
from detkit.compression.graph import example_images, trace_size
from detkit.compression.pruning import PruningResult, prune_model
from detkit.deploy.fuse import fuse_conv_bn
from detkit.engine.checkpoint import save_checkpoint
from detkit.errors import ConfigError
from detkit.utils.complexity import complexity
from detkit.utils.timing import median_ms

PRUNE_KEYS = ("ratio", "threshold", "min_channels", "max_layer_ratio", "round_to", "compensate")
SCHEDULE_KEYS = ("criterion", "calibration_batches", "steps")


def weights_megabytes(model: nn.Module) -> float:
    """Size in MB (10⁶ bytes) of ``model``'s serialised state dict: a checkpoint's weights."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6


def cpu_latency_ms(model: nn.Module, img_size: int, repeats: int, threads: int | None = None,
                   fuse: bool = True) -> float:
    """Median CPU wall time (ms) of one eval-mode forward of a (1, 3, img_size, img_size) batch, NMS included;
    ``fuse``: of a copy with BatchNorm folded into the convs (:func:`~detkit.deploy.fuse.fuse_conv_bn`), as
    deployed. Meaningful only on an otherwise idle machine."""
    model = fuse_conv_bn(model.cpu())[0] if fuse else model.cpu().eval()
    images = torch.rand(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return median_ms(lambda: model(images), repeats, warmup=3)
    finally:
        torch.set_num_threads(previous)


def measure_latencies(models: Mapping[str, nn.Module], img_size: int, repeats: int, rounds: int = 3,
                      threads: int | None = None, compiled: Sequence[str] = ()) -> dict[str, float]:
    """{name: median over ``rounds`` of the median batch-1 CPU latency (ms) of ``repeats`` forwards}, the
    models taking turns in every round. Names in ``compiled`` run through ``torch.compile`` (inductor, frozen
    weights: how int8 graphs get int8 kernels; inductor folds BatchNorm itself), the others with BatchNorm
    folded (:func:`~detkit.deploy.fuse.fuse_conv_bn`)."""
    from torch._inductor import config as inductor_config

    runners = {name: (torch.compile(m.cpu().eval()) if name in compiled else fuse_conv_bn(m.cpu())[0])
               for name, m in models.items()}
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, runner in runners.items():
            frozen = inductor_config.patch(freezing=True) if name in compiled else contextlib.nullcontext()
            with frozen:
                samples[name].append(cpu_latency_ms(runner, img_size, repeats, threads, fuse=False))
    return {name: statistics.median(values) for name, values in samples.items()}


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
    cfg.sparsity = None
    cfg.weights, cfg.resume, cfg.device = str(pruned_checkpoint), None, device
    cfg.trainer.epochs = int(epochs)
    return OmegaConf.merge(cfg, OmegaConf.create(dict(overrides or {})))


def checkpoint_evaluator(cfg: DictConfig, out_dir: Path, device: str = "cpu"):
    """Callable(model, name) → metrics on the val split of ``cfg``'s dataset, writing into ``out_dir/name``."""
    prepare_data(cfg.data)
    dataset = build_dataset(cfg.data, "val", train=False)
    loader = build_data_loader(dataset, cfg.data, train=False)
    metric, backend = cfg.eval.metric, cfg.eval.backend

    def evaluate(net: nn.Module, name: str) -> dict:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        return make_evaluator(dataset, loader, out_dir / name, device, metric, backend)(net.to(device).eval())

    return evaluate


def calibration_batches(cfg: DictConfig, count: int, device: str = "cpu") -> list[tuple[Tensor, list[dict]]]:
    """The first ``count`` (images (B, 3, S, S), targets) batches of ``cfg``'s training loader (its
    augmentation and seed), on ``device``: calibration data for the Taylor and APoZ criteria and int8."""
    if count < 1:
        raise ValueError(f"calibration_batches must be >= 1, got {count}")
    prepare_data(cfg.data)
    loader = build_data_loader(build_dataset(cfg.data, "train", cfg.seed), cfg.data, train=True, seed=cfg.seed)
    batches = []
    for images, targets in loader:
        targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        batches.append((images.to(device), targets))
        if len(batches) == count:
            break
    return batches


def _round_ratio(total: float, step: int, steps: int, original: int | None, current: int | None) -> float:
    # round `step` (1-based) removes what brings the cumulative removal to total * step / steps of the channels
    # the first round could prune
    if step == 1 or not original:
        return total / steps
    remaining = original * (1.0 - total * step / steps)
    return min(max(1.0 - remaining / max(current, 1), 0.0), 0.99)


def _merge_spec(spec: list, new: list) -> list:
    merged = {name: channels for name, channels in spec}
    merged.update({name: channels for name, channels in new})
    return [[name, channels] for name, channels in merged.items()]


def slim_checkpoint(checkpoint: str | Path, out_dir: str | Path, prune: Mapping, finetune: Mapping,
                    report: Mapping, device: str = "cpu") -> dict:
    """Prune ``checkpoint`` into ``out_dir/pruned.pt``, evaluate before and after, fine-tune
    ``finetune.epochs`` epochs (0: none) into ``out_dir/finetune/``, and write ``report.md`` / ``report.json``;
    returns the report (``final``: its last row, ``artifact``: the checkpoint of that row).

    ``prune``: :func:`~detkit.compression.pruning.prune_model` arguments plus ``criterion`` (``bn_gamma``,
    ``l1``, ``taylor``, ``apoz``: see :mod:`detkit.compression.criteria`), ``calibration_batches`` (training
    batches for taylor / apoz) and ``steps``: the iterative schedule, ``ratio`` reached in that many rounds of
    prune + fine-tune (each round's files are ``pruned_<k>.pt`` and ``finetune_<k>/``, the last round's the
    names above)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(prune) - set(PRUNE_KEYS) - set(SCHEDULE_KEYS)
    if unknown:
        raise ConfigError(f"unknown prune setting(s) {sorted(unknown)}; expected some of "
                         f"{', '.join(PRUNE_KEYS + SCHEDULE_KEYS)}")
    settings = dict(prune)
    criterion = settings["criterion"]
    steps, calibration = int(settings["steps"]), int(settings["calibration_batches"])
    if criterion not in CRITERIA:
        raise ConfigError(f"prune.criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if steps < 1 or (steps > 1 and settings["threshold"] is not None):
        raise ConfigError(f"prune.steps must be >= 1, and 1 with prune.threshold (a ratio is split over the "
                         f"rounds), got steps={steps}, threshold={settings['threshold']}")
    prune_args = {k: v for k, v in settings.items() if k in PRUNE_KEYS}
    epochs = int(finetune["epochs"])
    repeats, threads = int(report["latency_repeats"]), report["threads"]
    model, cfg, state = load_trained(checkpoint, device)
    evaluate = checkpoint_evaluator(cfg, out_dir, device)
    size = eval_img_size(cfg.data)  # latency at the size the mAP is measured at
    rows = {"unpruned": describe(model, size, evaluate(model, "unpruned"), repeats, threads)}
    spec, original, current, removed = list(cfg.channel_spec or []), None, None, 0
    # the same training batches score every round (fine-tuning changes the model, not the data)
    batches = calibration_batches(cfg, calibration, device) if criterion in ("taylor", "apoz") else []
    for step in range(1, steps + 1):
        last, tag = step == steps, ("" if steps == 1 else f" {step}/{steps}")
        ratio = _round_ratio(float(prune_args["ratio"]), step, steps, original, current)
        scores = criterion_scores(model, criterion, batches)
        result = prune_model(model, images=example_images(trace_size(model)).to(device), scores=scores,
                             **{**prune_args, "ratio": ratio})
        original = original or result.prunable
        current, removed = result.prunable - result.removed, removed + result.removed
        spec = result.channel_spec = _merge_spec(spec, result.channel_spec)
        rows[f"pruned{tag}"] = describe(model, size, evaluate(model, f"pruned{tag.replace('/', 'of')}"), repeats,
                                        threads)
        pruned = pruned_state(state, model, cfg, result, settings)
        pruned_path = save_checkpoint(pruned, out_dir / ("pruned.pt" if last else f"pruned_{step}.pt"))
        artifact = pruned_path
        # The pruned model's training config, for tools/train.py: --config-dir OUT --config-name pruned weights=...
        OmegaConf.save(OmegaConf.create(pruned["config"]), out_dir / "pruned.yaml")
        print(f"pruned {result.removed} of {result.prunable} prunable channels ({result.removed_fraction:.1%}, "
              f"{criterion}) -> {pruned_path}; fine-tune it with: python tools/train.py --config-dir {out_dir} "
              f"--config-name pruned weights={pruned_path}")
        if epochs > 0:
            ft_dir = out_dir / ("finetune" if last else f"finetune_{step}")
            ft_cfg = finetune_config(pruned["config"], pruned_path, epochs, finetune["overrides"], device)
            ft_dir.mkdir(exist_ok=True)
            OmegaConf.save(ft_cfg, ft_dir / "config.yaml")  # resume: --config-name config resume=...
            metrics = train_run(ft_cfg, ft_dir)
            artifact = ft_dir / "last.pt"
            model, cfg, state = load_trained(artifact, device)
            rows[f"fine-tuned{tag}"] = describe(model, size, metrics, repeats, threads)
    summary = {
        "checkpoint": str(checkpoint), "pruned_checkpoint": str(pruned_path), "prune": settings,
        "criterion": criterion, "steps": steps, "finetune_epochs": epochs, "prunable_channels": original,
        "removed_channels": removed, "removed_fraction": removed / max(original, 1),
        "skipped_groups": [list(s) for s in result.skipped], "channel_spec": spec, "rows": rows,
        "final": list(rows)[-1], "artifact": str(artifact),
    }
    table = format_report(rows)
    (out_dir / "report.md").write_text(
        f"# Channel pruning ({criterion}) of {checkpoint}\n\nprune {settings}; removed {removed} of {original} "
        f"prunable channels ({summary['removed_fraction']:.1%}) in {steps} round(s); fine-tune {epochs} epochs "
        f"per round; input {size} px; latency: median of {repeats} CPU batch-1 forwards (NMS included, "
        f"BatchNorm folded)"
        f"{f', {threads} threads' if threads else ''}\n\n{table}\n")
    (out_dir / "report.json").write_text(json.dumps(summary, indent=1))
    print(table)
    return summary
