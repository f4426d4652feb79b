"""A model's training recipe, carried by its own config (``model.recipe``) and applied to the run's config.

A model config may name values of the optimizer, schedule and Mosaic it is trained with, per option of those
config groups::

    recipe:
      optim/adamw: {lr: 0.001}             # applies while the run's optim is configs/optim/adamw.yaml's
      schedule/cosine: {warmup_steps: 300}
      mosaic/default: {prob: 0.0}          # the run's data.mosaic (every data config composes configs/mosaic)

An entry applies when the run's group config is that option (the same ``_target_`` as
``configs/<group>/<option>.yaml``): a recipe written for AdamW's lr does not set SGD's. A key named on the
``tools/train.py`` command line is the user's and is kept, and so is a value that is none of the group files'
(one set from Python). The values applied are written into the config, so the run's stored config shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from detkit.app.auto import command_line_keys, file_values, named
from detkit.errors import ConfigError
from detkit.utils.resolvers import config_dir

GROUPS = {"optim": "optim", "schedule": "schedule", "mosaic": "data.mosaic"}  # recipe group -> its place in the run
NOT_CONSTRUCTOR = ("bn_eps", "recipe")  # model config keys that are not the detector's constructor arguments
_ABSENT = object()  # OmegaConf.select's default for a key the group's config lacks (a null value is a value)


def detector_config(model_cfg: DictConfig) -> DictConfig:
    """``model_cfg`` without the keys that are not the detector's constructor arguments (:data:`NOT_CONSTRUCTOR`),
    its interpolations resolved against the run's config first (``${data.img_size}`` and the like: a copy loses
    the root they point into)."""
    if not any(key in model_cfg for key in NOT_CONSTRUCTOR):
        return model_cfg
    tree = OmegaConf.to_container(model_cfg, resolve=True)
    return OmegaConf.create({key: value for key, value in tree.items() if key not in NOT_CONSTRUCTOR})


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out += _leaves(value, path + ".") if isinstance(value, dict) else [(path, value)]
    return out


def apply_recipe(cfg: DictConfig, say: Callable[[str], None] = print, cli_keys: Sequence[str] | None = None) -> dict:
    """Write ``cfg.model.recipe``'s values into ``cfg`` (module docstring); returns the ``{key: value}`` applied.
    A malformed recipe (an entry not ``group/option``, a group outside :data:`GROUPS`, an option without a
    file, a key the group's config lacks) is a ConfigError naming the entry."""
    recipe = cfg.model.get("recipe")
    if not recipe:
        return {}
    cli_keys = command_line_keys() if cli_keys is None else cli_keys
    applied, kept = {}, []
    for entry, values in OmegaConf.to_container(recipe, resolve=True).items():
        group, _, option = str(entry).partition("/")
        path = config_dir() / group / f"{option}.yaml"
        if group not in GROUPS or not option or not path.is_file() or not isinstance(values, dict):
            raise ConfigError(f"model.recipe entry {entry!r}: expected '<group>/<option>: {{key: value}}' with "
                              f"<group> one of {', '.join(GROUPS)} and configs/<group>/<option>.yaml a file")
        place = GROUPS[group]
        node = OmegaConf.select(cfg, place)
        if node is None or OmegaConf.load(path).get("_target_") != node.get("_target_"):
            continue  # written for another option of the group, or the run has none (a data config without Mosaic)
        for key, value in _leaves(values):
            current = OmegaConf.select(node, key, default=_ABSENT)
            if current is _ABSENT:
                raise ConfigError(f"model.recipe entry {entry!r}: {place}.{key} is not a key of {path.name}")
            if named(f"{place}.{key}", cli_keys) or current not in file_values(group, key):
                kept.append(f"{place}.{key}={current}")
                continue
            OmegaConf.update(cfg, f"{place}.{key}", value)
            applied[f"{place}.{key}"] = value
    if applied or kept:
        say("model recipe: " + ", ".join([f"{k}={v}" for k, v in applied.items()]
                                          + [f"{k} (yours, kept)" for k in kept]))
    return applied
