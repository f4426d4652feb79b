"""Convert published weights: ``python tools/convert.py source=darknet weights=FILE model=NAME out=PATH
[img_size=416] [model.KEY=VALUE ...]``; ``source=torchvision weights=FILE|NAME model=ssd300 out=PATH`` (torchvision's
ssd300_vgg16, :mod:`detkit.convert.tv_ssd`); ``source=torchvision weights=FILE|NAME backbone=ARCH out=PATH`` (a
classifier's features as a ``backbone.pretrained=`` file); ``source=torchvision model=fpn_rcnn|retinanet
img_size=800`` (fasterrcnn_resnet50_fpn / retinanet_resnet50_fpn, :mod:`detkit.convert.tv_rcnn`; ``weights=`` a
state-dict file or a weights name such as ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``).

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

SOURCES = ("darknet", "torchvision")


@hydra.main(version_base="1.3", config_path="../configs", config_name="convert")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.source not in SOURCES:
            raise ConfigError(f"source must be one of {', '.join(SOURCES)}, got {cfg.source!r}")
        name = HydraConfig.get().runtime.choices.get("model")
        if cfg.source == "torchvision":
            convert_torchvision(cfg, name)
            return
        from detkit.convert.checkpoint import convert_darknet, published_class_names, published_input

        path = convert_darknet(cfg.weights, cfg.out, cfg.model, int(cfg.img_size), published_input(name),
                               class_names=published_class_names(name))
    print(f"wrote {path}: model={name} from {cfg.weights} ({cfg.source}), evaluated at {cfg.img_size} px")


def convert_torchvision(cfg: DictConfig, name: str) -> None:
    """source=torchvision: a backbone file (``backbone=``) or, by model name, a detector checkpoint."""
    from detkit.convert import tv_rcnn, tv_ssd

    named = any(o.split("=", 1)[0].lstrip("+~") == "img_size" for o in HydraConfig.get().overrides.task)
    if name in tv_rcnn.TORCHVISION_MODELS and not cfg.get("backbone"):
        size = int(cfg.img_size) if named else tv_rcnn.MIN_SIZE
        path = tv_rcnn.convert_torchvision(cfg.weights, cfg.out, cfg.model, size)
        print(f"wrote {path}: model={name} from {cfg.weights} (torchvision), evaluated at shorter side {size} px")
        return
    if cfg.get("backbone"):
        path = tv_ssd.convert_backbone(cfg.weights, cfg.backbone, cfg.out)
        print(f"wrote {path}: {cfg.backbone} features from {cfg.weights}, for model.backbone.pretrained={path}")
        normalization = tv_ssd.weights_normalization(cfg.weights)
        if normalization:
            mean, std = normalization
            print(f"these weights take input normalised with model.image_mean={mean} model.image_std={std}")
        return
    if name != "ssd300":
        raise ConfigError(f"source=torchvision converts model={', '.join(tv_rcnn.TORCHVISION_MODELS)} or ssd300 (or a "
                          f"backbone=), got model={name}")
    size = int(cfg.img_size) if named else 300
    path = tv_ssd.convert_torchvision_ssd(cfg.weights, cfg.out, size)
    print(f"wrote {path}: model=ssd300 from {cfg.weights} (torchvision ssd300_vgg16), at {size} px")


if __name__ == "__main__":
    main()
