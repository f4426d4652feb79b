"""Check a dataset before training: ``python tools/check_dataset.py [data=NAME data.KEY=...] [splits=[train,val]]``.

Prints every problem by file and record (what training would refuse), information (images without boxes,
near-duplicate boxes) and statistics (images, boxes per class, box sizes in letterboxed input pixels). Exits
with status 1 when there are problems, unless ``data.on_invalid=drop`` (training would then drop them).
"""

import hydra
from omegaconf import DictConfig

from detkit.app.build import prepare_data
from detkit.app.errors import user_errors
from detkit.data.check import check_dataset


@hydra.main(version_base="1.3", config_path="../configs", config_name="check_dataset")
def main(cfg: DictConfig) -> None:
    with user_errors():
        prepare_data(cfg.data)
        text, ok = check_dataset(cfg.data, list(cfg.splits))
    print(text)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
