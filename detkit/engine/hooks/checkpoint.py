"""Checkpoints during training, and atomic JSON writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

from detkit.engine.checkpoint import save_checkpoint
from detkit.engine.hooks.base import Hook


def write_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class CheckpointHook(Hook):
    """``last.pt`` after every epoch (and every ``every_steps`` steps if set), ``best.pt`` when the
    evaluation improves. ``extra`` (config, class names, ...) is stored in every checkpoint."""

    priority = 43
    main_process_only = True

    def __init__(self, out_dir: str | Path, extra: dict | None = None, every_steps: int = 0) -> None:
        self.out_dir, self.extra, self.every_steps = Path(out_dir), dict(extra or {}), every_steps

    def _state(self, trainer) -> dict:
        # "weights" are what evaluation and deployment use (the EMA when there is one).
        return {**trainer.state_dict(), "weights": trainer.state.eval_model.state_dict(), **self.extra}

    def after_step(self, trainer) -> None:
        if self.every_steps and trainer.state.global_step % self.every_steps == 0:
            save_checkpoint(self._state(trainer), self.out_dir / "last.pt")

    def after_epoch(self, trainer) -> None:
        state = self._state(trainer)
        save_checkpoint(state, self.out_dir / "last.pt")
        if trainer.state.is_best:
            save_checkpoint(state, self.out_dir / "best.pt")


