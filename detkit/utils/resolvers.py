"""Where detkit's configs live, and the OmegaConf resolvers they use (registered when ``detkit`` is imported)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> Path:
    """The folder of detkit's Hydra configs (``train.yaml`` and the groups ``model/``, ``data/`` ...): the
    repository's ``configs/``, installed as the package data ``detkit.configs`` (in an editable install, the
    repository folder itself)."""
    return Path(str(files("detkit.configs")))


def scaled_size(size: int, factor: float, multiple: int = 32) -> int:
    """``size × factor`` rounded to the nearest multiple of ``multiple`` (the network's largest stride), at least
    ``multiple``: ``${detkit.scaled_size:${data.img_size},1.25}`` is 480 for 384 and 128 for 96."""
    if size <= 0 or factor <= 0 or multiple <= 0:
        raise ValueError(f"detkit.scaled_size needs positive arguments, got size={size}, factor={factor}, "
                         f"multiple={multiple}")
    return max(multiple, int(size * factor / multiple + 0.5) * multiple)  # half up, not to even


def register() -> None:
    if not OmegaConf.has_resolver("detkit.scaled_size"):
        OmegaConf.register_new_resolver("detkit.scaled_size", scaled_size)
