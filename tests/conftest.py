import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The environment of a tool run as a subprocess from the tests: this checkout's detkit first, whatever is installed.
CHECKOUT_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CONFIGS.parent),
                                                                         os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="session")
def tiny_builtin(tmp_path_factory) -> Path:
    """A small built-in dataset (24 train / 8 val images, 96–128 px), generated once per test session."""
    from detkit.data.builtin import generate_builtin

    root = tmp_path_factory.mktemp("data") / "builtin"
    generate_builtin(root, num_train=24, num_val=8, seed=0, min_size=96, max_size=128, workers=1)
    return root


def compose_config(name: str = "train", overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_overrides(tiny_builtin) -> list[str]:
    """Overrides of configs/train.yaml for a seconds-long run on ``tiny_builtin``."""
    return [
        f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24", "data.builtin.num_val=8",
        "data.builtin.min_size=96", "data.builtin.max_size=128", "data.builtin.workers=1",
        "data.img_size=96", "data.batch_size=8", "data.eval_batch_size=8",
        "model.backbone.width=8", "model.backbone.depths=[1,1,1,1]",
        "trainer.epochs=2", "trainer.eval_every=1", "trainer.log_every=1", "trainer.threads=1",
    ]


@pytest.fixture
def tiny_train_config(tiny_overrides):
    """Training config for a seconds-long run on ``tiny_builtin``."""

    def make(*overrides: str):
        return compose_config("train", [*tiny_overrides, *overrides])

    return make
