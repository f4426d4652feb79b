"""Errors the user must fix: a bad file, a config value that cannot work. Their message says what is wrong
and where, in one line where possible; the tools print it as ``error: <message>`` without a stack trace
(:func:`detkit.app.errors.user_errors`). Anything else is a library error and keeps its traceback.

The subclasses are also ``ValueError`` so that callers written against the plain errors still catch them.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user must fix; the message alone tells them what and where."""


class CheckpointError(UserError, ValueError):
    """A file given as a checkpoint (or weights) that is not one detkit can read."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (an unknown name, a size the model cannot take)."""
