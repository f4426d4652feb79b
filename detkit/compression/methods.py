"""The compression methods of ``tools/slim.py method=...``, one function each, on a trained checkpoint.

Each ``run_<method>(checkpoint, out_dir, cfg, device)`` compresses the checkpoint's model, optionally fine-tunes
it with the normal trainer (``cfg.finetune.epochs``, the method's hook keeping its structure), writes a loadable
artifact and ``report.md`` / ``report.json`` into ``out_dir``, and returns the report: ``rows`` (each a
:func:`~detkit.compression.slim.describe` row: params, GFLOPs, weights MB, CPU batch-1 latency, AP, AP50),
``final`` (the row of the artifact) and ``artifact`` (its path, for :func:`load_artifact`). ``cfg`` is the
``tools/slim.py`` config (configs/slim.yaml) as a mapping.

- ``slim`` / ``l1`` / ``taylor`` / ``apoz``: structured channel pruning (:mod:`detkit.compression.slim`) by
  BatchNorm |γ| (or ``prune.criterion``) / filter L1 / Taylor / APoZ; artifact: ``pruned.pt`` or
  ``finetune/last.pt``, with ``channel_spec``.
- ``magnitude``: unstructured pruning, masks kept through fine-tuning; a normal checkpoint with zeros and
  ``sparsity.txt`` (per-layer table).
- ``dsd``: dense → sparse → dense (the masks released for the last phase); a normal checkpoint.
- ``deep_compression``: pruning, k-means weight sharing, centroid fine-tuning, Huffman coding; ``compressed.dkc``
  (+ ``compressed.json``: config and class names), evaluated after a reload.
- ``int8``: post-training static quantization of backbone/neck (no fine-tuning); ``int8_model/`` (one
  ``torch.export`` program per quantized part + the float rest), evaluated directly.
- ``lowrank``: SVD / Tucker-2 factorisation, fine-tuned as factorised; a checkpoint whose model config
  (:func:`lowrank_detector`) rebuilds the factorised architecture.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.app.build import build_model, eval_img_size
from detkit.app.evaluate import load_trained
from detkit.app.train import train as train_run
from detkit.compression import deep_compression as dc
from detkit.compression.graph import example_images
from detkit.compression.lowrank import apply_lowrank_spec, decompose_model, lowrank_spec
from detkit.compression.magnitude import MagnitudePruningHook, dsd_hook, prune_by_magnitude, sparsity_table
from detkit.compression.slim import (
    calibration_batches,
    checkpoint_evaluator,
    describe,
    finetune_config,
    format_report,
    measure_latencies,
    slim_checkpoint,
)
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.errors import ConfigError


def lowrank_detector(model: DictConfig, ranks: list, num_classes: int, channel_spec: list | None = None) -> nn.Module:
    """Hydra target of a factorised model's config: the detector ``model`` (its own config, not instantiated
    yet: ``_recursive_: false``), slimmed by ``channel_spec`` if any, with the layers of ``ranks``
    (``[[layer name, ranks], ...]`` from :func:`~detkit.compression.lowrank.lowrank_spec`) factorised."""
    from detkit.app.recipe import detector_config

    detector = instantiate(detector_config(model), num_classes=num_classes)
    if channel_spec:
        from detkit.compression.channels import apply_channel_spec

        apply_channel_spec(detector, channel_spec)
    apply_lowrank_spec(detector, {name: list(r) for name, r in ranks})
    return detector


class _Run:
    """What every method shares: the loaded checkpoint, its evaluator, the report rows, saving, fine-tuning."""

    def __init__(self, method: str, checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str) -> None:
        self.method, self.checkpoint, self.device = method, str(checkpoint), device
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.cfg, self.state = load_trained(checkpoint, device)
        self.evaluate = checkpoint_evaluator(self.cfg, self.out_dir, device)
        self.repeats, self.threads = int(cfg["report"]["latency_repeats"]), cfg["report"]["threads"]
        self.finetune = dict(cfg["finetune"])
        self.epochs = int(self.finetune["epochs"])
        self.size = eval_img_size(self.cfg.data)
        self.rows: dict[str, dict] = {}
        self.add_row("original", self.model)

    def add_row(self, name: str, model: nn.Module, metrics: Mapping | None = None) -> dict:
        metrics = self.evaluate(model, name) if metrics is None else metrics
        self.rows[name] = describe(model, self.size, metrics, self.repeats, self.threads)
        return self.rows[name]

    def config(self) -> dict:
        config = OmegaConf.to_container(self.cfg, resolve=True)
        config["resume"], config["weights"] = None, None
        return config

    def save(self, model: nn.Module, name: str, config: Mapping | None = None, **extra) -> Path:
        """``model`` as an ordinary detkit checkpoint ``out_dir/name`` (loads with ``weights_only=True``)."""
        weights = model.state_dict()
        return save_checkpoint({
            "model": weights, "weights": weights, "config": dict(config or self.config()),
            "class_names": list(self.state["class_names"]),
            "label_to_category_id": list(self.state.get("label_to_category_id", [])), **extra,
        }, self.out_dir / name)

    def fine_tune(self, start: Path, epochs: int, hooks: list = (), overrides: Mapping | None = None):
        """Train ``epochs`` epochs from checkpoint ``start`` into ``out_dir/finetune`` with ``hooks``;
        returns (model from its last.pt, final metrics, last.pt)."""
        merged = OmegaConf.merge(OmegaConf.create(dict(self.finetune["overrides"])),
                                 OmegaConf.create(dict(overrides or {})))
        cfg = finetune_config(load_checkpoint(start)["config"], start, epochs, merged, self.device)
        ft_dir = self.out_dir / "finetune"
        ft_dir.mkdir(exist_ok=True)
        OmegaConf.save(cfg, ft_dir / "config.yaml")
        metrics = train_run(cfg, ft_dir, list(hooks))
        model, _, _ = load_trained(ft_dir / "last.pt", self.device)
        return model, metrics, ft_dir / "last.pt"

    def finish(self, artifact: Path, details: str = "", **extra) -> dict:
        summary = {"method": self.method, "checkpoint": self.checkpoint, "artifact": str(artifact),
                   "final": list(self.rows)[-1], "finetune_epochs": self.epochs, **extra, "rows": self.rows}
        table = format_report(self.rows)
        (self.out_dir / "report.md").write_text(
            f"# {self.method} of {self.checkpoint}\n\nsettings {json.dumps(extra.get('settings', {}))}; artifact "
            f"{artifact}; input {self.size} px; latency: median of {self.repeats} CPU batch-1 forwards\n\n{table}\n"
            + (f"\n```\n{details}\n```\n" if details else ""))
        (self.out_dir / "report.json").write_text(json.dumps(summary, indent=1))
        print(table)
        return summary


def _settings(cfg: Mapping, key: str) -> dict:
    return dict(cfg[key])


def _pruning(criterion: str | None) -> Callable[..., dict]:
    def run(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
        prune = _settings(cfg, "prune")
        if criterion is not None:
            prune["criterion"] = criterion
        summary = slim_checkpoint(checkpoint, out_dir, prune, cfg["finetune"], cfg["report"], device)
        return {"method": criterion or "slim", **summary}

    run.__doc__ = f"Structured channel pruning by {criterion or 'prune.criterion (default bn_gamma)'}."
    return run


def run_magnitude(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Magnitude pruning to ``magnitude.sparsity`` (``scope``, ``exclude``), fine-tuned with the masks kept."""
    s = _settings(cfg, "magnitude")
    run = _Run("magnitude", checkpoint, out_dir, cfg, device)
    sparsity, scope, exclude = float(s["sparsity"]), s["scope"], list(s["exclude"])
    masks = prune_by_magnitude(run.model, sparsity, scope, exclude)
    run.add_row("pruned", run.model)
    model, artifact = run.model, run.save(run.model, "pruned.pt", magnitude=s)
    if run.epochs > 0:
        hook = MagnitudePruningHook(sparsity, scope, exclude, masks=masks)
        model, metrics, artifact = run.fine_tune(artifact, run.epochs, [hook])
        run.add_row("fine-tuned", model, metrics)
    table = sparsity_table(model, exclude)
    (run.out_dir / "sparsity.txt").write_text(table + "\n")
    return run.finish(artifact, table, settings=s)


def _dsd_epochs(s: Mapping, epochs: int) -> tuple[int, int]:
    sparse, dense = s["sparse_epochs"], s["dense_epochs"]
    if sparse is None:
        sparse = max(math.ceil(epochs / 2), 1) if epochs > 0 else 0
    if dense is None:
        dense = max(epochs - sparse, 1) if epochs > 0 else 0
    return int(sparse), int(dense)


def run_dsd(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Dense-Sparse-Dense from the trained (dense) checkpoint: ``dsd.sparse_epochs`` with the weights pruned to
    ``dsd.sparsity``, then ``dsd.dense_epochs`` with the masks released (null: ``finetune.epochs`` split in two
    halves, at least one each; 0 epochs: the pruned model only)."""
    s = _settings(cfg, "dsd")
    run = _Run("dsd", checkpoint, out_dir, cfg, device)
    sparsity, scope, exclude = float(s["sparsity"]), s["scope"], list(s["exclude"])
    sparse, dense = _dsd_epochs(s, run.epochs)
    if sparse + dense == 0:
        prune_by_magnitude(run.model, sparsity, scope, exclude)
        run.add_row("sparse", run.model)
        return run.finish(run.save(run.model, "sparse.pt", dsd=s), settings=s, sparse_epochs=0, dense_epochs=0)
    hook = dsd_hook(sparsity, 0, sparse, scope, exclude)
    start = run.save(run.model, "dense.pt")
    model, metrics, artifact = run.fine_tune(start, sparse + dense, [hook])
    run.add_row("dsd", model, metrics)
    return run.finish(artifact, settings=s, sparse_epochs=sparse, dense_epochs=dense)


def load_compressed_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """The eval-mode model of a ``deep_compression`` artifact: ``compressed.dkc`` beside its ``.json``."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    cfg = OmegaConf.create(meta["config"])
    model = build_model(cfg.model, len(meta["class_names"]), cfg.channel_spec)
    model.load_state_dict(dc.load_compressed(path))
    return model.to(device).eval()


def run_deep_compression(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Prune to ``deep_compression.sparsity``, share weights (``bits`` per cluster index), fine-tune the
    centroids, write the Huffman-coded file and evaluate it reloaded; its row's MB is the file on disk."""
    s = _settings(cfg, "deep_compression")
    run = _Run("deep_compression", checkpoint, out_dir, cfg, device)
    exclude = list(s["exclude"])
    prune_by_magnitude(run.model, float(s["sparsity"]), "layer", exclude)
    shared = dc.share_weights(run.model, s["bits"], exclude)
    run.add_row("pruned+shared", run.model)
    model = run.model
    if run.epochs > 0:
        # the EMA copy would not be tied to the centroids (see CentroidFineTuningHook)
        model, _, _ = run.fine_tune(run.save(model, "shared.pt"), run.epochs, [dc.CentroidFineTuningHook(shared)],
                                    {"trainer": {"ema": {"enabled": False}}})
        dc.tie_weights(model, shared)  # centroids = the fine-tuned tied values
    artifact = run.out_dir / "compressed.dkc"
    sizes = dc.save_compressed(model, shared, artifact, s["index_bits"])
    artifact.with_suffix(".json").write_text(json.dumps({
        "config": run.config(), "class_names": list(run.state["class_names"]),
        "label_to_category_id": list(run.state.get("label_to_category_id", []))}))
    run.add_row("compressed", load_compressed_model(artifact, device))
    run.rows["compressed"]["weights_mb"] = sizes.file_bytes / 1e6
    stages = {stage: size / 1e6 for stage, size in sizes.stages.items()}
    return run.finish(artifact, sizes.format(), settings=s, stages_mb=stages)


def run_int8(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Int8 static PTQ of ``int8.parts`` on ``int8.calibration_batches`` training batches (CPU, no fine-tuning);
    evaluated directly and persisted as ``int8_model/`` (see :func:`save_int8`). Params/GFLOPs are those of the
    float architecture; MB is the persisted folder; latency (``report.latency_repeats`` > 0) through
    ``torch.compile``, beside the float model's, also compiled."""
    from detkit.compression.quantize import quantize_features

    s = _settings(cfg, "int8")
    run = _Run("int8", checkpoint, out_dir, cfg, "cpu")  # x86 int8 kernels: CPU only
    parts = list(s["parts"])
    batches = [images for images, _ in calibration_batches(run.cfg, int(s["calibration_batches"]))]
    quantized = quantize_features(run.model, batches, parts, s["observer"])
    artifact = save_int8(quantized, parts, example_images(64, batch=2), run.state, run.config(),
                         run.out_dir / "int8_model")
    row = describe(run.model, run.size, run.evaluate(quantized, "int8"), 0)
    row["weights_mb"] = sum(f.stat().st_size for f in artifact.iterdir()) / 1e6
    if run.repeats:  # eager int8 only simulates (quantize/dequantize around float ops): time both compiled
        timed = measure_latencies({"original (compiled)": run.model, "int8": quantized}, run.size, run.repeats, 1,
                                  run.threads, compiled=["original (compiled)", "int8"])
        run.rows["original (compiled)"] = {**run.rows["original"], "latency_ms": timed["original (compiled)"]}
        row["latency_ms"] = timed["int8"]
    run.rows["int8"] = row
    return run.finish(artifact, settings=s, parts=parts, persisted=True)


def save_int8(quantized: nn.Module, parts: list[str], images: torch.Tensor, state: Mapping, config: Mapping,
              folder: Path) -> Path:
    """Persist a :func:`~detkit.compression.quantize.quantize_features` model: ``<part>.pt2`` (a
    ``torch.export`` program, dynamic batch/height/width) per quantized part, ``model.pt`` the rest of the state
    dict with config and class names. ``images``: (B ≥ 2, 3, H, W), a trace input."""
    from detkit.compression.quantize import _dynamic_shapes, _present_parts, _record_inputs

    folder.mkdir(parents=True, exist_ok=True)
    names = _present_parts(quantized, parts)
    for name in names:
        _drop_unused_attributes(getattr(quantized, name))
    recorded = _record_inputs(quantized, names, getattr(quantized, "raw_outputs", quantized), [images])
    for name in names:
        args = recorded[name][0]
        program = torch.export.export(getattr(quantized, name), args, dynamic_shapes=_dynamic_shapes(args))
        torch.export.save(program, folder / f"{name}.pt2")
    rest = {k: v for k, v in quantized.state_dict().items() if k.split(".")[0] not in names}
    save_checkpoint({"model": rest, "config": dict(config), "int8_parts": names,
                     "class_names": list(state["class_names"]),
                     "label_to_category_id": list(state.get("label_to_category_id", []))}, folder / "model.pt")
    return folder


def _drop_unused_attributes(graph: nn.Module) -> None:
    # convert_pt2e leaves the float weights beside the int8 copies the graph reads: drop what no node reads,
    # or torch.export would store them too
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in [*graph.named_parameters(), *graph.named_buffers()]:
        if name not in used:
            parent, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(parent) if parent else graph, leaf)


def load_int8(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The eval-mode int8 model of :func:`save_int8`'s ``folder`` (CPU)."""
    from detkit.compression.quantize import _allow_train_eval, _pt2e

    _pt2e()  # registers the quantized_decomposed ops that the saved programs call (torchao)
    folder = Path(folder)
    state = load_checkpoint(folder / "model.pt")
    cfg = OmegaConf.create(state["config"])
    model = build_model(cfg.model, len(state["class_names"]), cfg.channel_spec)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    parts = list(state["int8_parts"])
    if unexpected or any(k.split(".")[0] not in parts for k in missing):
        raise ValueError(f"{folder}/model.pt does not fit its model config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    for name in parts:
        setattr(model, name, _allow_train_eval(torch.export.load(folder / f"{name}.pt2").module()))
    return model.eval()


def run_lowrank(checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """SVD / Tucker-2 factorisation at ``lowrank.energy`` (``exclude``: name prefixes kept whole), fine-tuned
    as factorised; the checkpoint's model config is :func:`lowrank_detector` around the original one."""
    s = _settings(cfg, "lowrank")
    run = _Run("lowrank", checkpoint, out_dir, cfg, device)
    report = decompose_model(run.model, float(s["energy"]), list(s["exclude"]))
    config = run.config()
    config["model"] = {"_target_": f"{__name__}.lowrank_detector", "_recursive_": False, "model": config["model"],
                       "ranks": [[name, ranks] for name, ranks in lowrank_spec(report).items()],
                       "channel_spec": config["channel_spec"]}
    config["channel_spec"] = None
    run.add_row("factorised", run.model)
    artifact = run.save(run.model, "lowrank.pt", config)
    if run.epochs > 0:
        model, metrics, artifact = run.fine_tune(artifact, run.epochs)
        run.add_row("fine-tuned", model, metrics)
    return run.finish(artifact, report.format(), settings=s)


def _load_checkpoint_model(path: str | Path, device: str = "cpu") -> nn.Module:
    return load_trained(path, device)[0]


@dataclass(frozen=True)
class Method:
    """A compression method: ``run(checkpoint, out_dir, cfg, device) -> report`` and ``load(artifact, device)
    -> eval-mode model``."""

    run: Callable[..., dict]
    load: Callable[..., nn.Module] = _load_checkpoint_model


METHODS: dict[str, Method] = {
    "slim": Method(_pruning(None)),
    "l1": Method(_pruning("l1")),
    "taylor": Method(_pruning("taylor")),
    "apoz": Method(_pruning("apoz")),
    "magnitude": Method(run_magnitude),
    "dsd": Method(run_dsd),
    "deep_compression": Method(run_deep_compression, load_compressed_model),
    "int8": Method(run_int8, load_int8),
    "lowrank": Method(run_lowrank),
}


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown compression method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def run_method(name: str, checkpoint: str | Path, out_dir: str | Path, cfg: Mapping, device: str = "cpu") -> dict:
    """Run compression method ``name`` (a key of :data:`METHODS`) on ``checkpoint`` into ``out_dir``; ``cfg``:
    configs/slim.yaml's keys (a DictConfig or plain mapping)."""
    method = _method(name)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return method.run(checkpoint, out_dir, cfg, device)


def load_artifact(name: str, artifact: str | Path, device: str = "cpu") -> nn.Module:
    """The eval-mode model of method ``name``'s ``artifact`` (the ``artifact`` of its report)."""
    return _method(name).load(artifact, device)
