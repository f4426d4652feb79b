"""Convert published weights: ``python tools/convert.py source=darknet weights=FILE model=NAME out=PATH
[img_size=416] [model.KEY=VALUE ...]``.

Writes a detkit checkpoint (``detkit.load``, ``tools/eval.py checkpoint=``, ``predict.py``, ``export.py``,
``train.py weights=``) holding the weights, the config that rebuilds the model (with the published model's
conventions, e.g. darknet's BatchNorm ε) and the published file's class names (COCO's 80; VOC's 20 for
model=yolov1_darknet). Every value of the file is used: a file for
another model, a truncated one or one with values left over is refused with the counts.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.errors import ConfigError

SOURCES = ("darknet",)


@hydra.main(version_base="1.3", config_path="../configs", config_name="convert")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
        from detkit.convert.checkpoint import convert_darknet, published_class_names

        name = HydraConfig.get().runtime.choices.get("model")
        path = convert_darknet(cfg.weights, cfg.out, cfg.model, int(cfg.img_size),
                               class_names=published_class_names(name))
    print(f"wrote {path}: model={name} from {cfg.weights} ({cfg.source}), evaluated at {cfg.img_size} px")


if __name__ == "__main__":
    main()
