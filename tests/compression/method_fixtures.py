"""Shared by the compression-method tests: a tiny trained checkpoint (once per module) and the slim config."""

from pathlib import Path

import pytest
import torch

from detkit.app.train import train
from tests.conftest import compose_config


def tiny_overrides(root: Path) -> list[str]:
    """Training overrides for a seconds-long yolov3_compact (width 8) run on the tiny built-in data."""
    return [f"data.builtin.root={root}", "data.builtin.num_train=24", "data.builtin.num_val=8",
            "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1",
            "data.img_size=96", "data.batch_size=8", "data.eval_batch_size=8",
            "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]", "trainer.epochs=1",
            "trainer.eval_every=1", "trainer.log_every=1", "trainer.threads=1", "eval.plots=false"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_builtin, tmp_path_factory) -> Path:
    """A 1-epoch yolov3_compact (width 8) on the tiny built-in data, trained once per test module."""
    out = tmp_path_factory.mktemp("base")
    threads = torch.get_num_threads()
    try:
        train(compose_config("train", tiny_overrides(tiny_builtin)), out)  # trainer.threads=1
    finally:
        torch.set_num_threads(threads)
    return out / "last.pt"


def slim_config(*overrides: str):
    """configs/slim.yaml with ``overrides``, no latency timing."""
    return compose_config("slim", ["checkpoint=unused", "report.latency_repeats=0", *overrides])
