"""Head-to-head at an equal wall budget: ``python tools/bench_peers.py [--minutes 5] [--data-config builtin | --suite]
[--imgsz N] [--peer-threads all|default|both] [--peer-batch 16] [--out outputs/peers] [-- detkit overrides ...]``.

Trains detkit's default detector (``tools/train.py data=NAME trainer.max_minutes=M``) and ultralytics YOLOv8n from
scratch (``pip install detkit[bench]``; offline, no pretrained weights) for the same wall-clock budget on the
dataset of detkit's data config NAME (generated first if it is a generated one; the suite's on their val split),
one after the other in fresh processes, scores both with pycocotools on the same val json and writes a markdown
table and JSON into ``--out``. ``--suite`` does so on every generalization-suite dataset in turn and writes one
table of them. YOLOv8n gets every core (``--peer-threads all``; ultralytics itself takes cpu_count - 1),
out-of-the-box threads (``default``) or one run of each (``both``, the default with ``--suite``). Without
``--imgsz`` detkit trains and tests at its own sizes and YOLOv8n at detkit's training size. Run it on an
otherwise idle machine: it is a timing comparison.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for benchmarks/ (not installed)

from benchmarks.peer_benchmark import SUITE, format_peer_table, format_suite_table, peer_threads, run_pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--imgsz", type=int, default=None, help="both train and test at N px (default: detkit's)")
    parser.add_argument("--peer-model", default="yolov8n.yaml")
    parser.add_argument("--peer-batch", type=int, default=16, help="ultralytics' own default")
    parser.add_argument("--peer-threads", choices=("all", "default", "both"), default=None,
                        help="default: both with --suite, all otherwise")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data-config", default="builtin", help="a detkit data config: builtin, suite_tiny, coco...")
    data.add_argument("--suite", action="store_true", help=f"every suite dataset: {', '.join(SUITE)}")
    parser.add_argument("--out", default="outputs/peers")
    parser.add_argument("overrides", nargs="*", help="detkit config overrides, e.g. data.batch_size=16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = peer_threads(args.peer_threads or ("both" if args.suite else "all"))
    configs = SUITE if args.suite else (args.data_config,)
    results = {}
    for name in configs:
        results[name] = run_pair(name, out / name if args.suite else out, args.minutes, args.overrides, args.imgsz,
                                 threads, args.peer_batch, args.peer_model)
        print(format_peer_table(results[name], args.minutes, args.imgsz, name))
    if args.suite:
        table = format_suite_table(results, args.minutes)
        (out / "suite.md").write_text(table + "\n")
        (out / "suite.json").write_text(json.dumps({"minutes": args.minutes, "datasets": results}, indent=1))
    else:
        table = format_peer_table(results[args.data_config], args.minutes, args.imgsz, args.data_config)
        (out / "peers.md").write_text(table + "\n")
        (out / "peers.json").write_text(json.dumps(results[args.data_config], indent=1))
    print(table)


if __name__ == "__main__":
    main()
