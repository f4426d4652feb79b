"""Fit anchors to a dataset: ``python tools/anchors.py [data=NAME] [k=9] [num_scales=3] [split=train]``.

Box sizes are measured after the letterbox to ``data.img_size``; prints k anchors (w, h) grouped per scale and
their mean best IoU with the boxes. Writes nothing (the built-in dataset is generated on first use, as in
training).
"""

import hydra
from omegaconf import DictConfig

from detkit.app.auto import fill_sizes
from detkit.app.build import build_dataset, prepare_data, raw_dataset
from detkit.app.errors import user_errors
from detkit.data.anchor_stats import fit_anchors


@hydra.main(version_base="1.3", config_path="../configs", config_name="anchors")
def main(cfg: DictConfig) -> None:
    with user_errors():
        prepare_data(cfg.data)
        fill_sizes(cfg.data, lambda: raw_dataset(cfg.data, "train"))  # a user dataset's null sizes, as training
        dataset = build_dataset(cfg.data, cfg.split, cfg.seed, train=False)
        fit = fit_anchors(dataset, cfg.data.img_size, cfg.k, cfg.iters, cfg.seed, cfg.min_size)
    print(fit.format(cfg.num_scales))


if __name__ == "__main__":
    main()
