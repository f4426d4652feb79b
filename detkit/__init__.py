"""detkit: an object-detection training framework on PyTorch."""

from detkit.utils.resolvers import config_dir
from detkit.utils.resolvers import register as _register_resolvers

__all__ = ["config_dir"]

_register_resolvers()
