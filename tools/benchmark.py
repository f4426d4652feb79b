"""Time detkit ops against their torchvision baseline: ``python tools/benchmark.py postprocess [--quick]
[--device cpu|cuda] [--repeats N] [--threads N]``.

Prints median milliseconds per call and the ratio to the baseline timed in the same run; on a shared machine
trust the ratios more than the absolute times.
"""

import argparse

import torch

from detkit.utils.benchmark import format_table, postprocess_timings


def postprocess(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    print(f"device {args.device}, {repeats} repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for title, rows in postprocess_timings(repeats, args.device):
        print(format_table(title, rows))


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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
