"""Convert published weights: ``python tools/convert.py source=darknet weights=FILE model=NAME out=PATH
[img_size=416] [model.KEY=VALUE ...]``; torchvision's detectors with ``source=torchvision`` (``model=fpn_rcnn``
for fasterrcnn_resnet50_fpn, ``model=retinanet`` for retinanet_resnet50_fpn; ``weights=`` a state-dict file or
a weights name such as ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``).

Writes a detkit checkpoint (``detkit.load``, ``tools/eval.py checkpoint=``, ``predict.py``, ``export.py``,
``train.py weights=``) holding the weights, the config that rebuilds the model (with the published model's
conventions, e.g. darknet's BatchNorm ε) and COCO's 80 class names. Every value of the file is used: a file for
another model, a truncated one or one with values left over is refused with the counts.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.errors import ConfigError

SOURCES = ("darknet", "torchvision")


@hydra.main(version_base="1.3", config_path="../configs", config_name="convert")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
        name = HydraConfig.get().runtime.choices.get("model")
        if cfg.source == "torchvision":
            from detkit.convert.tv_rcnn import TORCHVISION_MODELS, convert_torchvision

            if name not in TORCHVISION_MODELS:
                raise ConfigError(f"source=torchvision converts model={' or model='.join(TORCHVISION_MODELS)}, "
                                  f"got model={name}")
            path = convert_torchvision(cfg.weights, cfg.out, cfg.model, int(cfg.img_size))
        else:
            from detkit.convert.checkpoint import convert_darknet

            path = convert_darknet(cfg.weights, cfg.out, cfg.model, int(cfg.img_size))
    print(f"wrote {path}: model={name} from {cfg.weights} ({cfg.source}), evaluated at {cfg.img_size} px")


if __name__ == "__main__":
    main()
