"""Training hooks, one file per concern; each declares its ``priority`` (they run in increasing order) and
keeps its checkpoint state under its own ``state_key``.

Default order: schedule 0, non-finite guard 5, EMA 10, time budget 20, Mosaic close-out 30, progress 40,
evaluation 41, plots 42, checkpoints 43, TensorBoard 44, SAT and other hooks 50 (compression), CmBN 70, gradient
clipping 100.
"""

from detkit.engine.hooks.base import Hook
from detkit.engine.hooks.budget import TimeBudgetHook
from detkit.engine.hooks.checkpoint import CheckpointHook, write_json
from detkit.engine.hooks.cmbn import CmBNHook, CrossMiniBatchNorm2d
from detkit.engine.hooks.ema import EMAHook, ModelEMA
from detkit.engine.hooks.evaluate import EvalHook
from detkit.engine.hooks.guard import NonFiniteGuard
from detkit.engine.hooks.log import PlotHook, ProgressHook, TensorBoardHook
from detkit.engine.hooks.mosaic import MosaicCloseHook
from detkit.engine.hooks.optim import GradClipHook, ScheduleHook
from detkit.engine.hooks.sat import SATHook

__all__ = ["Hook", "TimeBudgetHook", "CheckpointHook", "write_json", "EMAHook", "ModelEMA", "EvalHook",
           "NonFiniteGuard", "PlotHook", "ProgressHook", "TensorBoardHook", "MosaicCloseHook", "GradClipHook",
           "ScheduleHook", "SATHook", "CmBNHook", "CrossMiniBatchNorm2d"]
