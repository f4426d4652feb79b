"""Pre-train a detector's backbone on object crops: ``python tools/pretrain.py [model=NAME] [data=NAME]
[pretrain.epochs=N]``; then ``python tools/train.py model=NAME backbone_weights=RUN/backbone.pt``.

Writes ``backbone.pt`` and ``pretrain.json`` (loss and crop accuracy per epoch) into the run folder.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.app.pretrain import pretrain_backbone


@hydra.main(version_base="1.3", config_path="../configs", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    with user_errors():
        pretrain_backbone(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
