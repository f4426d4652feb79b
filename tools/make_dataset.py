"""Generate a dataset: ``python tools/make_dataset.py [kind=NAME] [root=DIR] [num_train=N] [num_val=N] [seed=S]``.

``kind=builtin`` (the default) generates what the data config generates (train.yaml's built-in dataset,
``data.builtin``; or ``data=suite_<kind>``'s ``data.generate``), with ``root``/``num_*``/``workers`` set in it;
``kind=tiny|large|crowded|wide`` generates that dataset of the generalization suite (also ``num_tune=N``) into
``root`` (default ``data/suite/<kind>``, where ``data=suite_<kind>`` reads it). A folder already complete with
the same settings is kept. ``tools/train.py`` does this on first use; run it alone to inspect the data.
"""

import hydra
from omegaconf import DictConfig

from detkit.app.build import prepare_data
from detkit.app.errors import user_errors
from detkit.data.suite import ensure_suite
from detkit.errors import ConfigError

OPTIONS = ("root", "num_train", "num_val", "num_tune", "workers")


@hydra.main(version_base="1.3", config_path="../configs", config_name="make_dataset")
def main(cfg: DictConfig) -> None:
    given = {key: cfg[key] for key in OPTIONS if cfg[key] is not None}
    with user_errors():
        if cfg.kind == "builtin":
            block = cfg.data.builtin or cfg.data.get("generate")
            if not block:
                raise SystemExit("the selected data config generates nothing (data.builtin and data.generate are null)")
            for key, value in given.items():
                if key not in block:
                    raise ConfigError(f"{key}={value}: the selected data config's generator has no {key}")
                block[key] = value
            prepare_data(cfg.data)
            name, root = "built-in" if cfg.data.builtin else block.kind, block.root
        else:
            name = cfg.kind
            root = ensure_suite(cfg.kind, given.pop("root", f"data/suite/{cfg.kind}"), seed=cfg.seed, **given)
    print(f"{name} dataset ready in {root}")


if __name__ == "__main__":
    main()
