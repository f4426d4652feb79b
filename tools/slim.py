"""Network Slimming: ``python tools/slim.py checkpoint=PATH [prune.ratio=0.5] [finetune.epochs=N] [out=DIR]``.

Prunes the checkpoint's channels by BatchNorm |γ| (train it with ``+compress=sparsity`` first), writes the
reloadable ``pruned.pt``, fine-tunes it when ``finetune.epochs`` > 0 (into ``finetune/``), and reports params,
FLOPs, checkpoint size, CPU batch-1 latency and AP before / after pruning / after fine-tuning in ``report.md``
and ``report.json``. Logic: :mod:`detkit.compression.slim`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from detkit.compression.slim import slim_checkpoint
from detkit.engine.launch import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="slim")
def main(cfg: DictConfig) -> None:
    out = cfg.get("out") or HydraConfig.get().runtime.output_dir
    with user_errors():
        slim_checkpoint(cfg.checkpoint, out, OmegaConf.to_container(cfg.prune), OmegaConf.to_container(cfg.finetune),
                        OmegaConf.to_container(cfg.report), cfg.device)


if __name__ == "__main__":
    main()
