"""detkit: an object-detection training framework on PyTorch."""

from detkit.utils.resolvers import register as _register_resolvers

_register_resolvers()
