"""OmegaConf resolvers the configs use; registered when ``detkit`` is imported."""

from __future__ import annotations

from omegaconf import OmegaConf


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
