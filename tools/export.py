"""Export a checkpoint: ``python tools/export.py checkpoint=PATH [format=onnx] [out=PATH] [img_size=N]``.

Writes ``model.onnx`` (network + box decoding, dynamic batch; NMS is the separate step
``detkit.postprocess.postprocess_detections``, which ``detkit.deploy.onnx.OnnxDetector`` applies) and a ``.json``
sidecar with the input size, post-processing settings and classes; prints onnxruntime's largest difference
from PyTorch on a random batch.
"""

import hydra
from omegaconf import DictConfig

from detkit.app.errors import user_errors
from detkit.deploy.onnx import export_checkpoint
from detkit.errors import ConfigError

FORMATS = ("onnx",)


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        if cfg.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
        path, sidecar = export_checkpoint(cfg.checkpoint, cfg.out, cfg.img_size, cfg.opset)
    print(f"wrote {path} and {path.with_suffix('.json')} (opset {sidecar['opset']}, input {sidecar['img_size']} px, "
          f"dynamic batch); onnxruntime vs PyTorch: max box diff {sidecar['max_box_diff']:.2e} px, "
          f"max score diff {sidecar['max_score_diff']:.2e}")


if __name__ == "__main__":
    main()
