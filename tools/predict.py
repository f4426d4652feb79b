"""Detect objects in images: ``python tools/predict.py checkpoint=PATH source=IMAGE_OR_DIR``.

Writes each image with its boxes drawn and ``detections.json`` into the run folder.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.engine.hooks import write_json
from detkit.engine.inference import predict_files
from detkit.engine.launch import load_trained, user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    out_dir = HydraConfig.get().runtime.output_dir
    with user_errors():
        model, train_cfg, state = load_trained(cfg.checkpoint, cfg.device)
        records = predict_files(model, cfg.source, out_dir, train_cfg.data.img_size, state["class_names"],
                                cfg.score_thresh, cfg.device)
    write_json(records, f"{out_dir}/detections.json")
    found = sum(len(r["detections"]) for r in records)
    print(f"{found} detections in {len(records)} images -> {out_dir}")


if __name__ == "__main__":
    main()
