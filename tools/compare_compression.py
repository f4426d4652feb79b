"""Compression methods compared: ``python tools/compare_compression.py checkpoint=PATH [finetune.epochs=1]
[slim.checkpoint=PATH] [swap.checkpoint=PATH | swap.model=yolov3_mobilenetv2 swap.epochs=N] [out=DIR]``;
``python tools/compare_compression.py retime=DIR`` measures a finished comparison's latencies again.

Runs every method of ``tools/slim.py`` from the same checkpoint with the same fine-tune budget, plus the
unpruned baseline and a lightweight-backbone swap, and writes ``table.md`` / ``table.json``: params, FLOPs,
file MB, CPU batch-1 latency (measured after all fine-tunes), AP50 and AP. Logic:
:mod:`detkit.compression.compare`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from detkit.app.errors import user_errors
from detkit.compression.compare import compare_compression, retime_comparison


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare_compression")
def main(cfg: DictConfig) -> None:
    if cfg.retime:
        with user_errors():
            retime_comparison(cfg.retime, OmegaConf.to_container(cfg.latency, resolve=True))
        return
    out = cfg.out or HydraConfig.get().runtime.output_dir
    with user_errors():
        compare_compression(cfg.checkpoint, out, OmegaConf.to_container(cfg, resolve=True), cfg.device)


if __name__ == "__main__":
    main()
