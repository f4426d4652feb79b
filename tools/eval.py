"""Evaluate a checkpoint: ``python tools/eval.py checkpoint=PATH [split=val] [eval.metric=coco|voc07|voc12]
[test_size=N] [data=coco data.val_json=...]``.

Prints the COCO table (or VOC mAP and per-class AP) and writes metrics.json, predictions.json, report.txt and
the plots (pr_curves.png, confusion_matrix.png, ap_per_class.png) into the run folder.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.app.evaluate import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate_checkpoint(cfg.checkpoint, HydraConfig.get().runtime.output_dir, cfg.get("data"), cfg.split,
                            cfg.device, cfg.eval.metric, cfg.eval.backend, cfg.eval.plots,
                            cfg.eval.tta, cfg.test_size)


if __name__ == "__main__":
    main()
