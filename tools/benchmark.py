"""Time detkit ops against their baseline: ``python tools/benchmark.py postprocess [--quick]
[--device cpu|cuda] [--repeats N] [--threads N]`` (vs torchvision), ``python tools/benchmark.py eval [--quick]
[--images 5000] [--classes 80]`` (COCO evaluation backends vs pycocotools), ``python tools/benchmark.py loader
[--quick] [--size 320] [--workers 2]`` (training loader img/s: Mosaic + yolo preset vs the default pipeline),
``python tools/benchmark.py ssd [--quick] [--repeats N] [--batch-size 4] [--threads N]`` (detkit SSD300 vs torchvision's
ssd300_vgg16: training step and inference on one 4x3x300x300 batch, CPU), ``python tools/benchmark.py yolo
[--quick] [--steps 200] [--size 256] [--threads N]`` (each _cpu YOLO config trained for the same budget on the
built-in data: mAP@0.5, mAP, params, FLOPs, CPU img/s), ``python tools/benchmark.py twostage [--quick]
[--repeats N] [--batch-size 2] [--size 512] [--device cpu|cuda] [--threads N]`` (detkit FPN R-CNN and RetinaNet vs
torchvision's fasterrcnn_resnet50_fpn and retinanet_resnet50_fpn: training step and inference, interleaved),
``python tools/benchmark.py report [--quick] [--repeats 3] [--out outputs/benchmark] [--only ssd300,...]``
(everything in one run, written as benchmark.md + benchmark.json), ``python tools/benchmark.py zoo --minutes M
[--families yolov3_cpu,ssd300,...] [--out outputs/zoo] [--latency-repeats 20] [--no-reference] [overrides ...]``
(every detector family's CPU config trained by tools/train.py for the same wall-clock budget on the same data, one
run after another: AP, AP50, APs, params, GFLOPs, train img/s, batch-1 latency, epochs and the command of each
row, written as zoo.md + zoo.json), ``python tools/benchmark.py parity [--epochs E | --minutes M]
[--pairs ssdlite,fpn_rcnn,retinanet] [--out outputs/parity] [overrides ...]`` (detkit's SSDLite, FPN R-CNN and
RetinaNet and torchvision's same detectors trained on the same batches, optimizer, lr schedule and budget, scored
by the same pycocotools evaluation: AP, AP50 and their ratio, written as parity.md + parity.json).

Prints median milliseconds per call and the ratio to the baseline timed in the same run; on a shared machine
trust the ratios more than the absolute times.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for benchmarks/ (not installed)

import torch

from benchmarks.benchmark import coco_eval_timings, format_table, postprocess_timings, ssd_timings
from benchmarks.loader_benchmark import format_throughputs, loader_throughputs
from benchmarks.parity_benchmark import PAIRS, format_parity, run_parity
from benchmarks.report_benchmark import format_report, run_report
from benchmarks.twostage_benchmark import twostage_timings
from benchmarks.yolo_benchmark import format_results, yolo_family
from benchmarks.zoo_benchmark import ZOO, format_zoo, run_zoo
from detkit.app.errors import user_errors


def postprocess(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    print(f"device {args.device}, {repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for title, rows in postprocess_timings(repeats, args.device):
        print(format_table(title, rows))


def evaluation(args: argparse.Namespace) -> None:
    images = 200 if args.quick else args.images
    print(f"{args.repeats or 1} repeats; generating {images} images x {args.classes} classes")
    title, rows = coco_eval_timings(images, args.classes, repeats=args.repeats or 1)
    print(format_table(title, rows))
    if len(rows) == 1:
        print("faster_coco_eval is not installed (pip install faster-coco-eval): pycocotools only")


def loader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # --quick: a small built-in dataset generated into a temporary folder instead of data/builtin.
        small = [f"data.builtin.root={tmp}", "data.builtin.num_train=96", "data.builtin.num_val=8"]
        batches = 3 if args.quick else args.batches
        rows = loader_throughputs(args.size, args.workers, args.batch_size, batches, small if args.quick else [])
    print(format_throughputs(f"training loader at {args.size} px, {args.workers} workers, batch {args.batch_size}, "
                             f"{batches} timed batches", rows))


def ssd(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    print(f"cpu, {repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for title, rows in ssd_timings(repeats, batch=args.batch_size):
        print(format_table(title, rows))


def yolo(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # --quick: 16 small generated images in a temporary folder, 2 steps, 128 px: checks that it runs.
        quick = [f"data.builtin.root={tmp}", "data.builtin.num_train=16", "data.builtin.num_val=8",
                 "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1"]
        size, steps = (128, 2) if args.quick else (args.size, args.steps)
        # The plain pipeline (no Mosaic) so that the budget is the same batches for every version.
        overrides = [*(quick if args.quick else []), f"data.img_size={size}", "data.mosaic.prob=0.0"]
        rows = yolo_family(steps=steps, overrides=overrides)
    print(format_results(f"_cpu YOLO configs, {steps} training steps at {size} px, built-in data without Mosaic, "
                         f"{torch.get_num_threads()} threads", rows))


def twostage(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    # --quick: ResNet-18 on one 64 px image, one repeat: checks that it runs.
    repeats = args.repeats or (1 if args.quick else 5)
    batch, size, depth = (1, 64, 18) if args.quick else (args.batch_size, args.size, 50)
    print(f"{args.device}, {repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for title, rows in twostage_timings(repeats, batch, size, depth=depth, device=args.device,
                                        warmup=0 if args.quick else 1):
        print(format_table(title, rows))


def report(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    only = tuple(args.only.split(",")) if args.only else None
    result = run_report(args.out, args.repeats or (1 if args.quick else 3), args.quick, args.device,
                        args.twostage_size, only)
    print(format_report(result))
    print(f"written: {args.out}/benchmark.md, {args.out}/benchmark.json")


def zoo(args: argparse.Namespace) -> None:
    families = [name.strip() for name in args.families.split(",") if name.strip()] if args.families else ZOO
    with user_errors():
        result = run_zoo(args.minutes, args.out, families, args.overrides, args.latency_repeats, args.reference)
    print(format_zoo(result))
    print(f"written: {args.out}/zoo.md, {args.out}/zoo.json")


def parity(args: argparse.Namespace) -> None:
    pairs = [name.strip() for name in args.pairs.split(",") if name.strip()]
    with user_errors():
        result = run_parity(args.out, pairs, args.overrides, minutes=args.minutes, epochs=args.epochs)
    print(format_parity(result))
    print(f"written: {args.out}/parity.md, {args.out}/parity.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections = parser.add_subparsers(dest="section", required=True)
    post = sections.add_parser("postprocess", help="postprocess_detections and the NMS variants vs batched_nms")
    post.set_defaults(run=postprocess)
    for sub in (post,):
        sub.add_argument("--quick", action="store_true", help="a few repeats, to check that it runs")
        sub.add_argument("--repeats", type=int, default=0, help="repeats per measurement (default 20, quick 3)")
        sub.add_argument("--device", default="cpu", help="cpu or cuda")
        sub.add_argument("--threads", type=int, default=0,
                         help="torch intra-op threads (default: torch's); 1 avoids thread contention on a busy CPU")
    coco = sections.add_parser("eval", help="COCO evaluation: faster_coco_eval vs pycocotools, same data")
    coco.set_defaults(run=evaluation)
    coco.add_argument("--quick", action="store_true", help="200 images, to check that it runs")
    coco.add_argument("--images", type=int, default=5000, help="validation images (default 5000, COCO's)")
    coco.add_argument("--classes", type=int, default=80, help="classes (default 80)")
    coco.add_argument("--repeats", type=int, default=0, help="repeats per measurement (default 1)")
    load = sections.add_parser("loader", help="training loader img/s: Mosaic + yolo preset vs the default pipeline")
    load.set_defaults(run=loader)
    load.add_argument("--quick", action="store_true", help="96 generated images, 3 batches, to check that it runs")
    load.add_argument("--size", type=int, default=320, help="input side (default 320)")
    load.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    load.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    load.add_argument("--batches", type=int, default=50, help="timed batches (default 50)")
    det = sections.add_parser("ssd", help="detkit SSD300 vs torchvision ssd300_vgg16: train step and inference")
    det.set_defaults(run=ssd)
    det.add_argument("--quick", action="store_true", help="one timed repeat, to check that it runs")
    det.add_argument("--repeats", type=int, default=0, help="repeats per measurement (default 5, quick 1)")
    det.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    det.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    fam = sections.add_parser("yolo", help="_cpu YOLO v1-v4 configs: same training budget, mAP, params, FLOPs, img/s")
    fam.set_defaults(run=yolo)
    fam.add_argument("--quick", action="store_true", help="16 images, 2 steps at 128 px, to check that it runs")
    fam.add_argument("--steps", type=int, default=200, help="training batches per config (default 200)")
    fam.add_argument("--size", type=int, default=256, help="input side, a multiple of 64 for YOLOv1 (default 256)")
    fam.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    two = sections.add_parser("twostage", help="detkit FPN R-CNN / RetinaNet vs torchvision's: train step, inference")
    two.set_defaults(run=twostage)
    two.add_argument("--quick", action="store_true", help="ResNet-18, one 64 px image, one repeat: checks that it runs")
    two.add_argument("--repeats", type=int, default=0, help="interleaved repeats per measurement (default 5)")
    two.add_argument("--batch-size", type=int, default=2, help="images per batch (default 2)")
    two.add_argument("--size", type=int, default=512, help="input side (default 512)")
    two.add_argument("--device", default="cpu", help="cpu or cuda")
    two.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    rep = sections.add_parser("report", help="everything in one run: detkit vs torchvision detectors, the default "
                              "model's img/s and GFLOP/s vs matmul, loader, evaluation; markdown + JSON")
    rep.set_defaults(run=report)
    rep.add_argument("--quick", action="store_true", help="small sizes, one repeat: checks that it runs")
    rep.add_argument("--repeats", type=int, default=0, help="interleaved repeats per measurement (default 3)")
    rep.add_argument("--out", default="outputs/benchmark", help="folder for benchmark.md and benchmark.json")
    rep.add_argument("--only", default="", help="comma-separated pairs: ssd300,ssdlite,fpn_rcnn,retinanet")
    rep.add_argument("--twostage-size", type=int, default=512, help="input side of the two-stage pairs")
    rep.add_argument("--device", default="cpu", help="cpu or cuda")
    rep.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    zo = sections.add_parser("zoo", help="every family's CPU config trained by tools/train.py for the same "
                             "wall-clock budget on the same data, one leaderboard: markdown + JSON")
    zo.set_defaults(run=zoo)
    zo.add_argument("--minutes", type=float, required=True, help="training budget of each run (trainer.max_minutes)")
    zo.add_argument("--families", default="", help=f"comma-separated configs/model names (default: {','.join(ZOO)})")
    zo.add_argument("--out", default="outputs/zoo", help="folder for zoo.md, zoo.json and one run folder per family")
    zo.add_argument("--latency-repeats", type=int, default=20, help="timed batch-1 inferences per model (default 20)")
    zo.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip timing torchvision's SSDLite training step, the machine's reference")
    zo.add_argument("overrides", nargs="*", help="Hydra overrides of every run, e.g. data=coco data.train_json=...; "
                    "FAMILY:key=value applies to one family's run only (yolov1_cpu:data=builtin_large)")
    par = sections.add_parser("parity", help="detkit vs torchvision detectors trained on the same batches, "
                              "optimizer, schedule and budget; AP/AP50 side by side: markdown + JSON")
    par.set_defaults(run=parity)
    budget = par.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs per side (default: trainer.epochs)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock training budget per side")
    par.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated (default: {','.join(PAIRS)})")
    par.add_argument("--out", default="outputs/parity", help="folder for parity.md and parity.json")
    par.add_argument("overrides", nargs="*", help="Hydra overrides of both sides, e.g. data=coco data.img_size=320; "
                     "PAIR:key=value applies to one pair only (retinanet:model.head_norm=gn)")
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
