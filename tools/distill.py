"""Distill a trained detector into a student: ``python tools/distill.py teacher=CKPT [model=NAME] [key=value ...]``.

The student trains as in ``tools/train.py`` (same config keys) with the teacher's loss terms added; see
``configs/compress/distill.yaml`` for the terms and :mod:`detkit.compression.distill`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.compression.distill import distill


@hydra.main(version_base="1.3", config_path="../configs", config_name="distill")
def main(cfg: DictConfig) -> float:
    with user_errors():
        metrics = distill(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("AP", 0.0)


if __name__ == "__main__":
    main()
