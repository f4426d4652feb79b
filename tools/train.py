"""Train a detector: ``python tools/train.py [model=...] [data=...] [trainer.epochs=N] [resume=PATH]``.

With no arguments: the compact YOLOv3 on the built-in dataset (generated into data/ on first use).
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.app.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    with user_errors():
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("AP", 0.0)


if __name__ == "__main__":
    main()
