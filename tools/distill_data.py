"""Data Distillation's pseudo-labels: ``python tools/distill_data.py teacher=CKPT images=DIR out=pseudo.json
[score_thresh=auto|0.5] [scales=[0.83,1.17]] [flip=true] [images_json=COCO_JSON]``.

The teacher labels the images (flip and scales merged by NMS, as ``tools/eval.py eval.tta=true``); the boxes
above the threshold are written as a COCO json with the teacher's categories, which training reads next to
the labelled set: ``data.extra_train=[{json: pseudo.json, images: DIR}]``. See
:mod:`detkit.app.data_distillation`; knowledge distillation is ``tools/distill.py``.
"""

import hydra
from omegaconf import DictConfig

from detkit.app.data_distillation import distill_data
from detkit.app.errors import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="distill_data")
def main(cfg: DictConfig) -> None:
    with user_errors():
        distill_data(cfg)


if __name__ == "__main__":
    main()
