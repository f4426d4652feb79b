"""One table comparing every compression method on one trained checkpoint (``tools/compare_compression.py``).

Every method of :mod:`detkit.compression.methods` runs from the same checkpoint with the same fine-tune budget
(Network Slimming from a sparsity-trained checkpoint when one is given), beside the unpruned baseline and a
lightweight-backbone swap (a given checkpoint of that model, or one trained with the normal trainer for as many
epochs as the base run). Accuracy comes from each method's own run; the CPU batch-1 latency of every row is
measured at the end, after all training, from the reloaded artifacts, in interleaved rounds with the same
threads, so that no row is timed while another job (a fine-tune) loads the machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.app.build import eval_img_size
from detkit.app.evaluate import load_trained
from detkit.app.train import train as train_run
from detkit.compression.methods import METHODS, load_artifact, run_method
from detkit.compression.slim import checkpoint_evaluator, describe, measure_latencies
from detkit.errors import ConfigError
from detkit.utils.resolvers import config_dir

DEFAULT_METHODS = tuple(METHODS)


def swap_config(base: DictConfig, model: str, epochs: int, overrides: Sequence[str] = ()) -> DictConfig:
    """The base run's training config with ``configs/model/<model>.yaml`` (plus ``overrides``, e.g.
    ``model.backbone.width=0.5``) instead of its model, for ``epochs`` epochs from scratch."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    arguments = [f"model={model}", *overrides]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config path is configs/
        composed = compose(config_name="train", overrides=arguments)
    else:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = compose(config_name="train", overrides=arguments)
    cfg = OmegaConf.create(OmegaConf.to_container(base, resolve=True))
    cfg.model = OmegaConf.to_container(composed.model, resolve=False)
    cfg.sparsity = None
    cfg.weights, cfg.resume, cfg.channel_spec = None, None, None
    cfg.trainer.epochs = int(epochs)
    return cfg


def nonzero_params(model: nn.Module) -> int:
    """Parameters that are not exactly zero (what sparse storage would keep)."""
    return int(sum((p != 0).sum() for p in model.parameters()))


def _ratio(first: float | None, value: float | None) -> str:
    return f"{first / value:.2f}x" if first and value else "–"


def format_table(rows: Mapping[str, dict], reference: str = "baseline") -> str:
    """Markdown: method × params, non-zero params, GFLOPs, weights MB, CPU latency, AP50, AP, and the baseline's
    params, FLOPs, MB and latency divided by the row's (2.00x: half)."""
    base = rows[reference]

    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = ["| method | params | non-zero params | GFLOPs | weights MB | CPU latency b1 (ms) | AP50 | AP | params ÷ "
             "| FLOPs ÷ | MB ÷ | latency ÷ | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['params'] / 1e6:.3f}M | {cell(r.get('nonzero_params'), ',')} | {r['gflops']:.3f} "
            f"| {r['weights_mb']:.3f} | {cell(r.get('latency_ms'), '.1f')} | {cell(r['AP50'], '.4f')} "
            f"| {cell(r['AP'], '.4f')} | {_ratio(base['params'], r['params'])} | {_ratio(base['gflops'], r['gflops'])} "
            f"| {_ratio(base['weights_mb'], r['weights_mb'])} | {_ratio(base.get('latency_ms'), r.get('latency_ms'))} "
            f"| {r.get('note', '')} |")
    return "\n".join(lines)


NOTES = {
    "magnitude": "zeros stored dense: no smaller file, no fewer FLOPs without sparse kernels",
    "dsd": "dense result (masks released)",
    "deep_compression": "MB = Huffman-coded file on disk; dense kernels at run time",
    "int8": "backbone+neck int8 (PTQ, no fine-tune); params/FLOPs of the float architecture",
}
COMPILED_NOTE = "; latency through torch.compile (int8 kernels): compare with 'baseline (compiled)'"


def compare_compression(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Run ``cfg.methods`` (default: all) on ``checkpoint`` into ``out_dir/<method>/``, add the baseline and the
    backbone swap (``cfg.swap``), time every row at the end, write ``table.md`` / ``table.json``; returns the
    table's data. ``cfg``: configs/compare_compression.yaml as a mapping (the method blocks of slim.yaml)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    methods = list(cfg.get("methods") or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown} in methods=; expected some of {', '.join(METHODS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    latency = dict(cfg.get("latency") or {})
    run_cfg = {**cfg, "report": {"latency_repeats": 0, "threads": None}}  # no timing while anything trains
    base_model, base_cfg, _ = load_trained(checkpoint, device)
    size = eval_img_size(base_cfg.data)
    rows = {"baseline": describe(base_model, size, checkpoint_evaluator(base_cfg, out_dir, device)(
        base_model, "baseline"), 0)}
    models: dict[str, nn.Module] = {"baseline": base_model}
    slim_checkpoint = (cfg.get("slim") or {}).get("checkpoint")
    slim_source = (f"the sparsity-trained {slim_checkpoint}" if slim_checkpoint
                   else "the base checkpoint (no sparsity training)")
    notes = {**NOTES, "slim": f"bn_gamma on {slim_source}"}
    runs = {}
    for method in methods:
        source = slim_checkpoint if method == "slim" and slim_checkpoint else checkpoint
        summary = run_method(method, source, out_dir / method, run_cfg, device)
        runs[method] = {"artifact": summary["artifact"], "final": summary["final"], "report": str(out_dir / method)}
        note = notes.get(method, "")
        if method == "dsd":
            note += f" after {summary['sparse_epochs']} sparse + {summary['dense_epochs']} dense epoch(s)"
        rows[method] = {**summary["rows"][summary["final"]], "note": note}
        models[method] = load_artifact(method, summary["artifact"], "cpu")
    swap = dict(cfg.get("swap") or {})
    if swap.get("checkpoint") or swap.get("model"):
        name, swap_path = _swap(swap, base_cfg, out_dir, device)
        model, swap_cfg, _ = load_trained(swap_path, device)
        metrics = checkpoint_evaluator(swap_cfg, out_dir, device)(model, "swap")
        rows[f"swap: {name}"] = {**describe(model, size, metrics, 0), "note": f"trained checkpoint {swap_path}"}
        models[f"swap: {name}"] = model
        runs["swap"] = {"artifact": str(swap_path)}
    for name, model in models.items():  # the int8 weights are graph constants, not parameters: not counted
        rows[name]["nonzero_params"] = nonzero_params(model) if name != "int8" else None
    _time_rows(rows, models, size, latency)
    epochs = int((cfg.get("finetune") or {}).get("epochs", 0))
    result = {"checkpoint": str(checkpoint), "size": size, "finetune_epochs": epochs, "slim_source": notes["slim"],
              "latency": latency, "rows": rows, "runs": runs}
    return _write(result, out_dir)


def _time_rows(rows: dict, models: Mapping[str, nn.Module], size: int, latency: Mapping) -> None:
    """Fill ``rows[name]['latency_ms']`` for every model (and a compiled baseline beside a compiled int8)."""
    repeats = int(latency.get("repeats", 50))
    if repeats <= 0:
        return
    compiled = ["int8"] if "int8" in models and latency.get("compile_int8", True) else []
    timed = dict(models)
    if compiled:
        if COMPILED_NOTE not in rows["int8"]["note"]:
            rows["int8"]["note"] += COMPILED_NOTE
        timed["baseline (compiled)"] = models["baseline"]
        rows["baseline (compiled)"] = {**rows["baseline"], "note": "baseline through torch.compile"}
        compiled.append("baseline (compiled)")
    measured = measure_latencies(timed, size, repeats, int(latency.get("rounds", 3)), latency.get("threads"),
                                 compiled)
    for name, value in measured.items():
        rows[name]["latency_ms"] = value


def _write(result: dict, out_dir: Path) -> dict:
    latency = result["latency"]
    note = (f"Checkpoint {result['checkpoint']}; input {result['size']} px; fine-tune budget "
            f"{result['finetune_epochs']} epoch(s) per method; latency: median of {int(latency.get('rounds', 3))} "
            f"interleaved rounds of the median of {int(latency.get('repeats', 50))} CPU batch-1 forwards (NMS "
            f"included, BatchNorm folded), threads: {latency.get('threads') or torch.get_num_threads()}, measured "
            f"after all fine-tunes. Weights MB: the serialised state dict (a weights-only checkpoint); "
            f"deep_compression: the Huffman-coded file; int8: the saved torch.export programs + the float rest. "
            f"Slimming row: {result['slim_source']}.")
    table = format_table(result["rows"])
    (out_dir / "table.md").write_text(f"# Compression methods compared\n\n{note}\n\n{table}\n")
    (out_dir / "table.json").write_text(json.dumps({**result, "note": note}, indent=1))
    print(table)
    return result


def retime_comparison(out_dir: str | Path, latency: Mapping) -> dict:
    """Measure again the latency of every row of a finished comparison in ``out_dir`` (its table.json and
    artifacts), e.g. on a quiet machine when something else ran during the first measurement; rewrites
    table.md / table.json."""
    out_dir = Path(out_dir)
    path = out_dir / "table.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no comparison to re-time (run tools/compare_compression.py first)")
    result = json.loads(path.read_text())
    rows = {k: v for k, v in result["rows"].items() if k != "baseline (compiled)"}
    models: dict[str, nn.Module] = {"baseline": load_trained(result["checkpoint"], "cpu")[0]}
    for name in rows:
        if name in result["runs"]:
            models[name] = load_artifact(name, result["runs"][name]["artifact"], "cpu")
        elif name.startswith("swap: "):
            models[name] = load_trained(result["runs"]["swap"]["artifact"], "cpu")[0]
    result.update(rows=rows, latency=dict(latency))
    _time_rows(rows, models, int(result["size"]), latency)
    return _write(result, out_dir)


def _swap(swap: Mapping, base_cfg: DictConfig, out_dir: Path, device: str) -> tuple[str, Path]:
    if swap.get("checkpoint"):
        path = Path(swap["checkpoint"])
        name = load_trained(path, "cpu")[1].model.get("backbone", {}).get("_target_", "model").rsplit(".", 1)[-1]
        return name, path
    epochs = swap.get("epochs") or base_cfg.trainer.epochs
    overrides = list(swap.get("overrides") or [])
    cfg = swap_config(base_cfg, swap["model"], int(epochs), overrides)
    cfg.device = device
    train_run(cfg, out_dir / "swap")
    return str(swap["model"]) + (f" ({', '.join(overrides)})" if overrides else ""), out_dir / "swap" / "last.pt"
