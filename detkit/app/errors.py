"""User errors: mistakes the user must fix end in one clear line, not a stack trace."""

from __future__ import annotations

import contextlib

from detkit.data.validation import DatasetError


@contextlib.contextmanager
def user_errors():
    """Turn errors the user must fix (bad dataset, missing file) into a clean exit with just their message,
    instead of a stack trace."""
    try:
        yield
    except (DatasetError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
