"""Compression of a trained checkpoint: ``python tools/slim.py checkpoint=PATH [method=slim] [finetune.epochs=N]
[out=DIR]``.

``method``: ``slim`` (Network Slimming: channels pruned by BatchNorm |γ|, train with ``+compress=sparsity``
first; ``prune.criterion`` picks another ranking), ``l1``, ``taylor``, ``apoz`` (the same channel pruner ranked
by those criteria), ``magnitude``, ``dsd``, ``deep_compression``, ``int8``, ``lowrank``. Each writes a reloadable
artifact, fine-tunes it when ``finetune.epochs`` > 0, and reports params, FLOPs, checkpoint size, CPU batch-1
latency and AP before / after in ``report.md`` and ``report.json``. Logic: :mod:`detkit.compression.methods`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from detkit.app.errors import user_errors
from detkit.compression.methods import run_method


@hydra.main(version_base="1.3", config_path="../configs", config_name="slim")
def main(cfg: DictConfig) -> None:
    out = cfg.out or HydraConfig.get().runtime.output_dir
    with user_errors():
        run_method(cfg.method, cfg.checkpoint, out, OmegaConf.to_container(cfg, resolve=True), cfg.device)


if __name__ == "__main__":
    main()
