"""Parameters and FLOPs of a model config and of variants of it, at one input size, by
:func:`detkit.utils.complexity.compare` (eval-mode forward, multiply-add = 2 FLOPs)::

    python tools/complexity.py model=yolov3 --size 416 --variant model.backbone.block=igc \\
        --variant "model.backbone.deform_stages=[3,4]"

Positional arguments are Hydra overrides of configs/train.yaml shared by every row; each ``--variant`` adds its
own (space-separated) overrides to make one more row. The first row (no variant) is the reference of the ratios.
``--module backbone`` counts one top-level part of each model only. Every model is built from seed 0; a
two-stage detector's head FLOPs still depend on how many proposals its random-init RPN keeps.
"""

import argparse
import shlex
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from detkit.app.build import build_model
from detkit.app.errors import user_errors
from detkit.errors import ConfigError
from detkit.utils.complexity import compare

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every row (model=NAME ...)")
    parser.add_argument("--variant", action="append", default=[], help="overrides of one more row")
    parser.add_argument("--size", type=int, default=416, help="square input side in pixels")
    parser.add_argument("--classes", type=int, default=80, help="number of object classes")
    parser.add_argument("--module", default=None, help="count this top-level part only (e.g. backbone)")
    args = parser.parse_args()
    with user_errors(), initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        models = {}
        for variant in [""] + args.variant:
            cfg = compose(config_name="train", overrides=list(args.overrides) + shlex.split(variant))
            torch.manual_seed(0)
            model = build_model(cfg.model, args.classes)
            if args.module is not None:
                if not isinstance(getattr(model, args.module, None), torch.nn.Module):
                    raise ConfigError(f"--module {args.module}: {type(model).__name__} has no such part; it has "
                                      f"{', '.join(name for name, _ in model.named_children())}")
                model = getattr(model, args.module)
            models[variant or " ".join(args.overrides) or "default"] = model
        print(compare(models, (1, 3, args.size, args.size)))


if __name__ == "__main__":
    main()
