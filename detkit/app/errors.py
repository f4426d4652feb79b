"""User errors: mistakes the user must fix end in one clear line, not a stack trace; and the checks that find
them before any data are loaded."""

from __future__ import annotations

import contextlib
import sys

from hydra.errors import InstantiationException
from torch import nn

from detkit.errors import ConfigError, UserError

USER_ERRORS = (UserError, FileNotFoundError)


@contextlib.contextmanager
def user_errors():
    """Turn errors the user must fix (:class:`~detkit.errors.UserError`: bad dataset, checkpoint or config
    value; a missing file) into ``error: <message>`` on stderr and exit status 1 (2 for a config error),
    without a stack trace; also when Hydra's ``instantiate`` wrapped them. Other errors keep their traceback."""
    try:
        yield
    except (*USER_ERRORS, InstantiationException) as exc:
        error = exc.__cause__ if isinstance(exc, InstantiationException) else exc
        if not isinstance(error, USER_ERRORS):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, ConfigError) else 1) from None


def check_input_size(model: nn.Module, size: int, key: str) -> None:
    """Raise :class:`ConfigError` naming the config ``key`` when ``model`` cannot take ``size`` × ``size``
    inputs: a YOLO needs a multiple of its coarsest stride (``model.strides[-1]``), YOLOv1 exactly its ``input_size``
    (its grid of cells is fixed). The model would refuse them itself, but only at its first forward."""
    strides = getattr(model, "strides", None)
    if strides and size % strides[-1]:
        raise ConfigError(f"{key}={size}: the input size of {type(model).__name__} must be a multiple of "
                          f"{strides[-1]}, its coarsest stride")
    fixed = getattr(model, "input_size", None)
    if isinstance(fixed, int) and size != fixed:
        raise ConfigError(f"{key}={size}: {type(model).__name__} is built for {fixed} px inputs (its "
                          f"grid of cells is fixed); use {fixed} or build the model with input_size={size}")
