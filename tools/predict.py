"""Detect objects in images: ``python tools/predict.py checkpoint=PATH source=IMAGE_OR_DIR [batch_size=8]
[save_images=false] [save_json=true ann_file=COCO_JSON] [fuse=false]``.

Writes ``detections.json`` (and each image with its boxes drawn) into the run folder; ``save_json`` also
writes ``results.json`` in COCO's results format (image ids from ``ann_file`` by file name, else positions).
"""

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detkit.app.build import eval_img_size, eval_letterbox
from detkit.app.errors import user_errors
from detkit.app.evaluate import load_trained
from detkit.app.predict import coco_results, predict_files
from detkit.deploy.fuse import fuse_conv_bn
from detkit.engine.hooks import write_json


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    out_dir = HydraConfig.get().runtime.output_dir
    with user_errors():
        model, train_cfg, state = load_trained(cfg.checkpoint, cfg.device)
        if cfg.fuse:
            model = fuse_conv_bn(model, inplace=True)[0]
        size = cfg.test_size or eval_img_size(train_cfg.data)
        records = predict_files(model, cfg.source, out_dir, size, state["class_names"],
                                cfg.score_thresh, cfg.device, cfg.batch_size, cfg.save_images,
                                letterbox=eval_letterbox(train_cfg.data, size))
        write_json(records, f"{out_dir}/detections.json")
        if cfg.save_json:
            ids = None
            if cfg.ann_file:
                with open(cfg.ann_file) as f:
                    ids = {im["file_name"].split("/")[-1]: im["id"] for im in json.load(f)["images"]}
            write_json(coco_results(records, state["label_to_category_id"], ids), f"{out_dir}/results.json")
    found = sum(len(r["detections"]) for r in records)
    print(f"{found} detections in {len(records)} images -> {out_dir}")


if __name__ == "__main__":
    main()
