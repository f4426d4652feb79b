"""Look at training samples: ``python tools/browse_dataset.py [data=NAME] [n=16] [epoch=0] [out=browse.png]``.

Writes one PNG grid of the first ``n`` samples of the epoch's shuffled order, after the configured augmentation
(preset, Mosaic) at ``data.img_size``, with boxes and class names drawn.
"""

import hydra
from omegaconf import DictConfig
from PIL import Image

from detkit.app.auto import fill_sizes
from detkit.app.build import build_dataset, prepare_data, raw_dataset
from detkit.app.errors import user_errors
from detkit.data.browse import sample_grid
from detkit.data.loader import ResumableSampler
from detkit.data.multiscale import MultiScaleDataset


@hydra.main(version_base="1.3", config_path="../configs", config_name="browse_dataset")
def main(cfg: DictConfig) -> None:
    with user_errors():
        prepare_data(cfg.data)
        fill_sizes(cfg.data, lambda: raw_dataset(cfg.data, "train"))  # a user dataset's null sizes, as training
        dataset = build_dataset(cfg.data, cfg.split, cfg.seed, train=cfg.augment)
    if isinstance(dataset, MultiScaleDataset):  # browse at data.img_size
        dataset = dataset.dataset
    dataset.set_epoch(cfg.epoch)
    sampler = ResumableSampler(len(dataset), cfg.seed, shuffle=cfg.augment)
    sampler.set_epoch(cfg.epoch)
    order = list(sampler)[: cfg.n]
    Image.fromarray(sample_grid(dataset, order, dataset.class_names)).save(cfg.out)
    print(f"wrote {len(order)} samples to {cfg.out}")


if __name__ == "__main__":
    main()
