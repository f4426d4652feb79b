"""The one-command performance report (``tools/benchmark.py report``): on the current device, in one process,
detkit's detectors against torchvision's implementations of the same architectures, the default model's
throughput beside the machine's measured matmul rate, the training loader and COCO evaluation; written as a
markdown table and JSON.

Every comparison is timed in interleaved repetitions (theirs, ours, theirs, ours ...) and reported as medians
and a ratio, so a slow spell of the machine hits both sides alike.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.benchmark import coco_eval_timings, inference_fn, synthetic_batch, train_config, train_step_fn
from benchmarks.twostage_benchmark import twostage_models
from detkit.app.build import build_model
from detkit.engine.amp import resolve_precision
from detkit.engine.trainer import model_to
from detkit.utils.complexity import complexity
from detkit.utils.timing import interleaved_medians


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The machine's achievable dense rate: GFLOP/s of an n×n by n×n matrix product (2n³ FLOPs), best of
    ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def default_model_throughput(batch: int = 8, steps: int = 5, overrides: list[str] = (), device: str = "cpu") -> dict:
    """The main job's model on synthetic batches at its configured input size: training img/s (forward,
    backward, AdamW step, under the configured precision) and inference img/s (post-processing included), and
    the GFLOP/s they achieve (training counted as 3× the forward FLOPs: forward, and backward for inputs and
    weights)."""
    cfg = train_config(overrides)
    size = cfg.data.img_size
    model = build_model(cfg.model, 10).to(device)
    flops = complexity(model, (1, 3, size, size)).flops
    precision, dtype = resolve_precision(cfg.trainer.precision, torch.device(device))
    images, targets = synthetic_batch(batch, size)
    targets = [{"boxes": t["boxes"], "labels": t["labels"] % 10} for t in targets]
    images = images.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model = model_to(model, device, bool(cfg.trainer.channels_last))
    images = images.contiguous(memory_format=layout)

    def train_step() -> None:
        model.train()
        with torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(images)

    ms = interleaved_medians({"train": train_step, "infer": infer}, steps, warmup=1, device=device)
    train_ips, infer_ips = batch / ms["train"] * 1000, batch / ms["infer"] * 1000
    return {"model": type(model).__name__, "img_size": size, "batch": batch, "precision": precision,
            "gflops_per_image": flops / 1e9, "train_img_s": train_ips, "infer_img_s": infer_ips,
            "train_gflop_s": 3 * flops * train_ips / 1e9, "infer_gflop_s": flops * infer_ips / 1e9}


def _ssd_pairs(num_classes: int) -> dict[str, tuple[str, nn.Module, str, nn.Module, int, int]]:
    from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large

    ours_ssd = build_model(train_config(["model=ssd300"]).model, num_classes)
    ours_lite = build_model(train_config(["model=ssdlite"]).model, num_classes)
    tv_ssd = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    tv_lite = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    # (baseline name, baseline, detkit name, detkit model, input side, label offset of the baseline)
    return {"ssd300": ("torchvision ssd300_vgg16", tv_ssd, "detkit SSD300", ours_ssd, 300, 1),
            "ssdlite": ("torchvision ssdlite320_mobilenet_v3_large", tv_lite, "detkit SSDLite (MobileNetV2)",
                        ours_lite, 320, 1)}


def detector_pairs(num_classes: int = 20, twostage_size: int = 512, depth: int = 50,
                   only: tuple[str, ...] | None = None) -> dict:
    """Every detkit detector that torchvision also implements (or those in ``only``), with its torchvision twin
    (weights=None)."""
    pairs = _ssd_pairs(num_classes) if only is None or {"ssd300", "ssdlite"} & set(only) else {}
    names = {"fpn_rcnn": ("torchvision fasterrcnn_resnet50_fpn", "detkit FPNRCNN", 1),
             "retinanet": ("torchvision retinanet_resnet50_fpn", "detkit RetinaNet", 0)}
    twostage = twostage_models(num_classes, depth, twostage_size) if only is None or set(names) & set(only) else {}
    for key, (theirs, ours) in twostage.items():
        tv_name, our_name, offset = names[key]
        pairs[key] = (tv_name.replace("resnet50", f"resnet{depth}"), theirs, our_name, ours, twostage_size, offset)
    return {k: v for k, v in pairs.items() if only is None or k in only}


def pair_timings(pairs: dict, repeats: int, train_batch: int = 2, infer_batches: tuple[int, ...] = (1, 8),
                 num_classes: int = 20, device: str = "cpu") -> list[dict]:
    """Rows ``{pair, phase, baseline, detkit, baseline_ms, detkit_ms, ratio, params_baseline, params_detkit}``:
    a training step at ``train_batch`` and inference (post-processing included) at each of ``infer_batches``."""
    rows = []
    for key, (tv_name, theirs, our_name, ours, size, offset) in pairs.items():
        theirs, ours = theirs.to(device), ours.to(device)
        phases = []
        images, targets = synthetic_batch(max(train_batch, *infer_batches), size)
        images = images.to(device)
        targets = [{"boxes": t["boxes"].to(device), "labels": (t["labels"] % num_classes).to(device)}
                   for t in targets]
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + offset} for t in targets]
        b = train_batch
        phases.append((f"train step, batch {b}", train_step_fn(theirs, images[:b], shifted[:b]),
                       train_step_fn(ours, images[:b], targets[:b])))
        for b in infer_batches:
            phases.append((f"inference, batch {b}", inference_fn(theirs, images[:b]), inference_fn(ours, images[:b])))
        for phase, tv_fn, our_fn in phases:
            ms = interleaved_medians({tv_name: tv_fn, our_name: our_fn}, repeats, warmup=1, device=device)
            rows.append({"pair": key, "phase": phase, "size": size, "baseline": tv_name, "detkit": our_name,
                         "baseline_ms": ms[tv_name], "detkit_ms": ms[our_name], "ratio": ms[our_name] / ms[tv_name],
                         "params_baseline": sum(p.numel() for p in theirs.parameters()),
                         "params_detkit": sum(p.numel() for p in ours.parameters())})
    return rows


def loader_and_eval(quick: bool) -> dict:
    """Training-loader img/s of the default pipeline and the COCO evaluation time of 500 images x 10 classes
    (the built-in val split's shape)."""
    from benchmarks.loader_benchmark import loader_throughputs

    with tempfile.TemporaryDirectory() as tmp:
        small = [f"data.builtin.root={tmp}", "data.builtin.num_train=16", "data.builtin.num_val=4",
                 "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1"]
        loaders = loader_throughputs(128 if quick else 384, 0, 8, 2 if quick else 30, small if quick else [])
    _, evals = coco_eval_timings(20 if quick else 500, 10, repeats=1)
    return {"loader_img_s": {name: ips for name, ips in loaders},
            "coco_eval_ms": {t.name: t.median_ms for t in evals}}


def run_report(out_dir: str | Path, repeats: int = 3, quick: bool = False, device: str = "cpu",
               twostage_size: int = 512, only: tuple[str, ...] | None = None) -> dict:
    """Everything above; writes ``benchmark.md`` and ``benchmark.json`` into ``out_dir`` and returns the JSON.
    ``only``: the detector pairs to time (default all: ssd300, ssdlite, fpn_rcnn, retinanet); ``quick``: small
    sizes and single repeats, to check that it runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "repeats": repeats}
    report["matmul_gflop_s"] = {"fp32": matmul_gflops(torch.float32, 512 if quick else 2048, device=device),
                                "bf16": matmul_gflops(torch.bfloat16, 512 if quick else 2048, device=device)}
    report["default_model"] = default_model_throughput(2 if quick else 8, 1 if quick else 5,
                                                       ["data.img_size=64"] if quick else [], device)
    pairs = detector_pairs(twostage_size=64 if quick else twostage_size, depth=18 if quick else 50, only=only)
    report["detectors"] = pair_timings(pairs, repeats, 1 if quick else 2, (1, 2) if quick else (1, 8), device=device)
    report.update(loader_and_eval(quick))
    (out_dir / "benchmark.json").write_text(json.dumps(report, indent=1))
    (out_dir / "benchmark.md").write_text(format_report(report))
    return report


def format_report(r: dict) -> str:
    """The markdown the README's performance table is pasted from."""
    d = r["default_model"]
    peak = r["matmul_gflop_s"]["bf16" if d["precision"] == "bf16" else "fp32"]
    lines = [f"device {r['device']} ({r['machine']}), {r['threads']} threads, torch {r['torch']}, "
             f"medians of {r['repeats']} interleaved repeats", "",
             "| detector pair | phase | torchvision ms | detkit ms | detkit / torchvision | params tv / detkit (M) |",
             "|---|---|---:|---:|---:|---:|"]
    for row in r["detectors"]:
        lines.append(f"| {row['baseline']} vs {row['detkit']} ({row['size']} px) | {row['phase']} | "
                     f"{row['baseline_ms']:.1f} | {row['detkit_ms']:.1f} | {row['ratio']:.2f} | "
                     f"{row['params_baseline'] / 1e6:.2f} / {row['params_detkit'] / 1e6:.2f} |")
    lines += ["", f"default model {d['model']} at {d['img_size']} px, batch {d['batch']}, {d['precision']}: "
              f"{d['gflops_per_image']:.2f} GFLOPs per image",
              "", "| | img/s | achieved GFLOP/s | of the matmul rate |", "|---|---:|---:|---:|",
              *(f"| {name} | {d[f'{key}_img_s']:.1f} | {d[f'{key}_gflop_s']:.1f} | {d[f'{key}_gflop_s'] / peak:.0%} |"
                for name, key in (("training step", "train"), ("inference", "infer"))),
              "", f"matmul rate (2048², best of 5): fp32 {r['matmul_gflop_s']['fp32']:.1f} GFLOP/s, "
              f"bf16 {r['matmul_gflop_s']['bf16']:.1f} GFLOP/s", "",
              "| training loader | img/s |", "|---|---:|"]
    lines += [f"| {name} | {ips:.1f} |" for name, ips in r["loader_img_s"].items()]
    lines += ["", "| COCO evaluation, 500 images x 10 classes | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.0f} |" for name, ms in r["coco_eval_ms"].items()]
    return "\n".join(lines) + "\n"
