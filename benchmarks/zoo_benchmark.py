"""Every detector family at one wall-clock budget, one leaderboard: ``tools/benchmark.py zoo``.

Each row is one run of ``python tools/train.py model=NAME trainer.max_minutes=M eval.plots=false [overrides]`` in
a fresh process (:func:`benchmarks.peer_benchmark.run_training`): the model's own recipe (its optimizer, lr and
schedule, EMA, the data-adaptive defaults of ``detkit/app/auto.py``), planned by the run itself to end, final
evaluation included, within the budget. The runs go one after another, never two at once: it is a timing table.
A row then reads what the run wrote: the final evaluation (``metrics.json``: pycocotools' statistics on the data
config's eval split) and the training totals of ``last.pt`` (its ``progress`` entry: images, seconds of
training steps, epochs); and measures the trained checkpoint in this process at the evaluation size:
parameters, GFLOPs (:func:`detkit.utils.complexity.complexity`) and the CPU latency of one image.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from benchmarks.benchmark import inference_fn
from benchmarks.peer_benchmark import in_repository, run_training, scoped_overrides, train_arguments
from detkit.api import compose_train_config
from detkit.app.build import build_dataset, eval_img_size
from detkit.app.evaluate import load_trained
from detkit.engine.amp import native_bf16, resolve_precision
from detkit.engine.hooks import write_json
from detkit.errors import ConfigError
from detkit.utils.complexity import complexity
from detkit.utils.resolvers import config_dir
from detkit.utils.timing import median_ms

# The CPU-size config of every family, in the table's order: the YOLO versions, SSD, then the region-based
# detectors, G-CNN's grid regressed in steps beside Fast R-CNN's dense proposals.
ZOO = ("yolov1_cpu", "yolov2_cpu", "yolov3_cpu", "yolov3_spp_cpu", "yolov4_cpu", "yolov3_compact", "ssd300_cpu",
       "ssdlite_cpu", "fast_rcnn_cpu", "gcnn_cpu", "fpn_rcnn_cpu", "retinanet_cpu")
STATS = ("AP", "AP50", "APs")


def zoo_order(families: Sequence[str]) -> list[str]:
    """``families`` in :data:`ZOO`'s order, configs outside it after them in the order given; repeats dropped."""
    unique = list(dict.fromkeys(families))
    return sorted(unique, key=lambda name: (ZOO.index(name), 0) if name in ZOO else (len(ZOO), unique.index(name)))


def family_configs(families: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, DictConfig]:
    """The training config of each family (``model=NAME`` + ``overrides``), composed before any run so that a
    missing model config, a bad override, an evaluation that gives no COCO statistics or external region
    proposals (which the latency's lone image lacks) fail at once (:class:`~detkit.errors.ConfigError`)."""
    models = config_dir() / "model"
    missing = [name for name in families if not (models / f"{name}.yaml").is_file()]
    if missing:
        available = ", ".join(sorted(p.stem for p in models.glob("*.yaml")))
        raise ConfigError(f"no model config {', '.join(f'{models}/{name}.yaml' for name in missing)}; "
                          f"available: {available}")
    configs = {name: compose_train_config([f"model={name}", *family_overrides(name, families, overrides)])
               for name in families}
    for name, cfg in configs.items():
        if cfg.eval.metric != "coco":
            raise ConfigError(f"eval.metric={cfg.eval.metric} (model={name}): the zoo table reports COCO's AP, AP50 "
                              "and APs; leave eval.metric at coco")
        if cfg.data.get("proposals_file"):
            raise ConfigError(f"data.proposals_file={cfg.data.proposals_file}: the zoo compares detectors that find "
                              "their own regions (fast_rcnn_cpu uses dense proposals); leave it null")
    return configs


def family_overrides(family: str, families: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """The ``overrides`` of ``family``'s run: the plain ones and those written ``FAMILY:key=value`` for it
    (``yolov1_cpu:data=builtin_large``: YOLOv1 on its large-object variant), unprefixed."""
    return scoped_overrides(family, families, overrides, "zoo family")


def reproduce_command(family: str, minutes: float, overrides: Sequence[str] = ()) -> str:
    """The shell command, run from the repository, that trains ``family``'s row again."""
    return shlex.join(["python", "tools/train.py", f"model={family}", *train_arguments(minutes, overrides)])


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` while inside (None: left as they are)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(model: torch.nn.Module, image: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model``'s eval-mode forward with post-processing on ``image`` (3, S, S), a batch
    of one, after ``warmup`` untimed calls."""
    return median_ms(inference_fn(model, image[None]), repeats, warmup)


def measure_checkpoint(checkpoint: str | Path, repeats: int = 20) -> dict:
    """Parameters, GFLOPs of one (1, 3, S, S) forward and the batch-1 :func:`latency_ms` on the first image of
    the eval split letterboxed to S, the checkpoint's evaluation size (``data.test_size``), with the torch threads
    its run trained with (``trainer.threads``); and the precision that run trained in (``trainer.precision``, auto
    resolved here: bf16 only where the CPU computes it natively, where most configs step 1.3-1.75x faster)."""
    model, cfg, _ = load_trained(checkpoint)
    size = eval_img_size(cfg.data)
    with in_repository():  # the run's relative data paths are the repository's
        image, _ = build_dataset(cfg.data, "val", train=False)[0]
    with torch_threads(cfg.trainer.threads):
        ms = latency_ms(model, image, repeats)
    c = complexity(model, (1, 3, size, size))
    precision, _ = resolve_precision(cfg.trainer.precision, torch.device(cfg.get("device", "cpu")))
    return {"params": c.params, "flops": c.flops, "img_size": int(cfg.data.img_size), "test_size": int(size),
            "threads": int(cfg.trainer.threads or torch.get_num_threads()), "latency_ms": ms, "precision": precision}


def read_run(run_dir: str | Path) -> dict:
    """A finished run's final COCO statistics (:data:`STATS`, from ``metrics.json``) and training totals (the
    ``progress`` entry of ``last.pt``): images, seconds of training steps, their img/s, and epochs done."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    totals = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["hooks"].get("progress")
    if not totals:
        raise ConfigError(f"{run_dir / 'last.pt'} holds no training totals: the run left out hooks.progress")
    return {**{k: metrics[k] for k in STATS}, "images": totals["images"], "train_seconds": totals["seconds"],
            "train_img_s": totals["images"] / max(totals["seconds"], 1e-9), "epochs": totals["epochs"]}


def run_family(family: str, minutes: float, overrides: Sequence[str], out_dir: str | Path,
               repeats: int = 20) -> dict:
    """Train ``family`` for ``minutes`` into ``out_dir/family`` (its output in ``run.log`` there) and measure it:
    one table row. A failed run gives a row with its ``error``."""
    run_dir = Path(out_dir).resolve() / family
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"model": family, "command": reproduce_command(family, minutes, overrides), "run_dir": str(run_dir)}
    with open(run_dir / "run.log", "w") as log:
        try:
            row["wall_s"] = run_training(run_dir, minutes, [f"model={family}", *overrides], stdout=log,
                                         stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError as error:
            return {**row, "error": f"tools/train.py exited with status {error.returncode}; see {run_dir / 'run.log'}"}
    return {**row, **read_run(run_dir), **measure_checkpoint(run_dir / "last.pt", repeats)}


def ssdlite_reference_ms(repeats: int = 3) -> float:
    """The machine's speed in a figure the README's Benchmarks table also gives: median ms of a training step
    of torchvision's ssdlite320_mobilenet_v3_large, batch 2 at 320 px, timed as ``tools/benchmark.py report``
    times it (interleaved with detkit's SSDLite)."""
    from benchmarks.report_benchmark import detector_pairs, pair_timings

    rows = pair_timings(detector_pairs(only=("ssdlite",)), repeats, train_batch=2, infer_batches=(1,))
    return next(r["baseline_ms"] for r in rows if r["phase"] == "train step, batch 2")


def run_zoo(minutes: float, out_dir: str | Path, families: Sequence[str] = ZOO, overrides: Sequence[str] = (),
            repeats: int = 20, reference: bool = True, log: Callable[[str], None] = print) -> dict:
    """Every family in :func:`zoo_order`, one run after another; writes ``zoo.json`` and ``zoo.md`` into
    ``out_dir`` after each (a long run that stops keeps its finished rows) and returns the JSON. ``repeats``:
    timed calls of the latency; ``reference``: time :func:`ssdlite_reference_ms` first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = zoo_order(families)
    family_configs(families, overrides)
    result = {"minutes": minutes, "overrides": list(overrides), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "native_bf16": native_bf16(torch.device("cpu")),
              "reference": None, "rows": []}
    if reference:
        result["reference"] = {"name": "torchvision ssdlite320_mobilenet_v3_large train step, batch 2, 320 px",
                               "ms": ssdlite_reference_ms()}
        log(f"reference: {result['reference']['name']}: {result['reference']['ms']:.1f} ms")
    for i, family in enumerate(families, 1):
        log(f"[{i}/{len(families)}] {family}: {minutes:g} min -> {out_dir / family}")
        row = run_family(family, minutes, family_overrides(family, families, overrides), out_dir, repeats)
        log(f"  {row['error']}" if "error" in row else
            f"  AP {row['AP']:.4f}, {row['epochs']:.2f} epochs, {row['train_img_s']:.1f} img/s")
        result["rows"].append(row)
        write_json(result, out_dir / "zoo.json")
        (out_dir / "zoo.md").write_text(format_zoo(result))
    return result


def format_zoo(result: dict) -> str:
    """The markdown leaderboard of :func:`run_zoo`'s JSON; the best AP in bold (unless it is 0)."""
    done = [r for r in result["rows"] if "error" not in r]
    best = max((r["AP"] for r in done), default=None)
    threads = {r["threads"] for r in done} or {result["threads"]}
    precisions = {r.get("precision", "?") for r in done} or {"?"}
    lines = [f"budget {result['minutes']:g} min per model, CPU ({result['machine']}), torch {result['torch']}, "
             f"threads {threads.pop() if len(threads) == 1 else 'per run (zoo.json)'}, training precision "
             f"{precisions.pop() if len(precisions) == 1 else 'per run (zoo.json)'} (native bf16: "
             f"{'yes' if result.get('native_bf16') else 'no'}); AP, AP50, APs by pycocotools on the data config's "
             "eval split; GFLOPs and batch-1 latency at the evaluation size", ""]
    if result["reference"]:
        lines += [f"machine reference: {result['reference']['name']}: {result['reference']['ms']:.1f} ms (the "
                  "README's Benchmarks table gives the same row)", ""]
    lines += ["| model | AP | AP50 | APs | params (M) | GFLOPs | train img/s | latency ms | epochs | command |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | | | `{r['command']}` |")
            continue
        ap = f"**{r['AP']:.4f}**" if r["AP"] == best > 0 else f"{r['AP']:.4f}"
        lines.append(f"| {r['model']} | {ap} | {r['AP50']:.4f} | {r['APs']:.4f} | {r['params'] / 1e6:.2f} | "
                     f"{r['flops'] / 1e9:.2f} | {r['train_img_s']:.1f} | {r['latency_ms']:.1f} | {r['epochs']:.2f} | "
                     f"`{r['command']}` |")
    return "\n".join(lines) + "\n"
