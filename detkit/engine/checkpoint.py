"""Checkpoints: written atomically, read back with ``weights_only=True`` (no arbitrary code on load)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file in the same folder and an atomic rename, so a
    crash mid-write leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`; a missing or unreadable file raises an error
    naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise RuntimeError(f"checkpoint {path} could not be read: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise RuntimeError(f"checkpoint {path} is not a detkit checkpoint (no 'model' entry)")
    return state
