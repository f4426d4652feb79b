"""Checkpoints: written atomically, read back with ``weights_only=True`` (no arbitrary code on load)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from detkit.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` only once it is complete and synced (a temporary
    file in the same folder and an atomic rename), so a crash mid-write leaves the previous file intact, never
    a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` with :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing file raises FileNotFoundError, any
    other file (not a torch file, truncated, holding Python objects, without a ``model`` entry) a
    :class:`CheckpointError` naming it."""
    state = load_torch_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a readable detkit checkpoint: it holds no 'model' entry")
    return state


def load_torch_file(path: str | Path, kind: str = "checkpoint", map_location: str | torch.device = "cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code. A missing
    file raises FileNotFoundError; a file torch cannot read this way raises :class:`CheckpointError`
    "``path`` is not a readable detkit ``kind``: <why>", one line without torch's own advice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    try:
        with warnings.catch_warnings():  # the unpickler warns about protocols before refusing a foreign pickle
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        if isinstance(exc, RuntimeError) and "device" in str(exc):  # map_location's fault, not the file's
            raise
        raise CheckpointError(f"{path} is not a readable detkit {kind}: {_unreadable_reason(path, exc)}") from None


def _unreadable_reason(path: Path, exc: Exception) -> str:
    """Why torch could not load ``path``, in a few words, from the file's first bytes and the error's type."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    with open(path, "rb") as f:
        head = f.read(4)
    unsafe = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    if unsafe:
        return f"it holds Python objects ({unsafe.group(1)}), which are not loaded since that could run code"
    if not head:
        return "the file is empty"
    if head == b"PK\x03\x04":  # torch.save's zip format
        return "the file is truncated or corrupt"
    if head[:1] == b"\x80":  # a pickle stream, torch's legacy format
        return "a pickle that is truncated, corrupt or holds more than tensors and plain containers"
    return "not a file written by torch.save"
