"""Generate the built-in dataset: ``python tools/make_dataset.py [data.builtin.num_train=N] [seed=S]``.

``tools/train.py`` does this on first use; run it alone to inspect or regenerate the data.
"""

import hydra
from omegaconf import DictConfig

from detkit.app.build import prepare_data


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    if not cfg.data.builtin:
        raise SystemExit("the selected data config is not the built-in dataset; nothing to generate")
    prepare_data(cfg.data)
    print(f"built-in dataset ready in {cfg.data.builtin.root}")


if __name__ == "__main__":
    main()
