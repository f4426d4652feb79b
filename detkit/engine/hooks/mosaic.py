"""Mosaic's close-out epochs follow the planned run."""

from __future__ import annotations

from detkit.engine.hooks.base import Hook


class MosaicCloseHook(Hook):
    """Keeps a :class:`~detkit.data.mosaic.Mosaic` dataset's last ``close_last`` epochs without mosaics at the
    end of the run as planned: after :meth:`Trainer.plan` moves the end, the dataset learns the new number of
    epochs. ``mosaic``: the Mosaic dataset, or None (then the hook does nothing)."""

    priority = 30

    def __init__(self, mosaic=None) -> None:
        self.mosaic = mosaic

    def after_plan(self, trainer) -> None:
        if self.mosaic is not None and self.mosaic.close_last:
            self.mosaic.epochs = trainer.state.epochs
