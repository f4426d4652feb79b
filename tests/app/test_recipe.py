"""A model's training recipe (model.recipe, detkit/app/recipe.py): its optimizer and schedule values reach the
run's config, for the optimizer they were written for, unless the user set the key; its Mosaic values reach the run's
data.mosaic the same way; a malformed recipe is a
ConfigError naming its entry; the detector is built without it."""

import pytest
import torch
from omegaconf import OmegaConf

from detkit.app.build import build_model, build_optimization
from detkit.app.recipe import apply_recipe
from detkit.errors import ConfigError
from tests.conftest import compose_config


def test_a_models_recipe_sets_its_lr_unless_the_user_named_it():
    cfg = compose_config("train", ["model=fast_rcnn_cpu"])
    assert cfg.optim.lr == 0.006  # AdamW's file value before the recipe
    said = []
    assert apply_recipe(cfg, said.append, cli_keys=[]) == {"optim.lr": 0.001}
    assert cfg.optim.lr == 0.001 and "optim.lr=0.001" in said[0]
    optimizer, _ = build_optimization(cfg, build_model(cfg.model, num_classes=3), steps_per_epoch=10)
    assert all(group["initial_lr"] == pytest.approx(0.001) for group in optimizer.param_groups)
    # named on the command line: the user's
    cfg = compose_config("train", ["model=fast_rcnn_cpu", "optim.lr=0.02"])
    assert apply_recipe(cfg, said.append, cli_keys=["optim.lr"]) == {} and cfg.optim.lr == 0.02
    assert "optim.lr=0.02 (yours, kept)" in said[-1]
    # set from Python to a value no optim file gives: the user's too
    cfg = compose_config("train", ["model=fast_rcnn_cpu", "optim.lr=0.0123"])
    assert apply_recipe(cfg, said.append, cli_keys=[]) == {} and cfg.optim.lr == 0.0123
    # written for AdamW: SGD keeps its own lr
    cfg = compose_config("train", ["model=fast_rcnn_cpu", "optim=sgd"])
    assert apply_recipe(cfg, said.append, cli_keys=[]) == {} and cfg.optim.lr == 0.01
    # a model without a recipe changes nothing
    cfg = compose_config("train", [])
    assert apply_recipe(cfg, said.append, cli_keys=[]) == {} and cfg.optim.lr == 0.006


def test_a_models_recipe_sets_the_runs_mosaic_unless_the_user_or_the_data_config_chose_it():
    cfg = compose_config("train", ["model=yolov1_cpu", "data=builtin_large"])
    assert cfg.data.mosaic.prob == 0.5  # configs/mosaic/default.yaml's
    said = []
    applied = apply_recipe(cfg, said.append, cli_keys=[])
    assert applied == {"optim.lr": 0.001, "data.mosaic.prob": 0.0} and cfg.data.mosaic.prob == 0.0
    assert "data.mosaic.prob=0.0" in said[0]
    # named on the command line
    cfg = compose_config("train", ["model=yolov1_cpu", "data.mosaic.prob=0.5"])
    assert "data.mosaic.prob" not in apply_recipe(cfg, said.append, cli_keys=["data.mosaic.prob"])
    assert cfg.data.mosaic.prob == 0.5 and "data.mosaic.prob=0.5 (yours, kept)" in said[-1]
    # a data config (or Python) that gives its own value no mosaic file gives keeps it
    cfg = compose_config("train", ["model=yolov1_cpu", "data.mosaic.prob=0.3"])
    assert "data.mosaic.prob" not in apply_recipe(cfg, said.append, cli_keys=[]) and cfg.data.mosaic.prob == 0.3
    # a data config without Mosaic: nothing to set, no error
    cfg = compose_config("train", ["model=yolov1_cpu"])
    OmegaConf.set_struct(cfg, False)
    del cfg.data["mosaic"]
    assert apply_recipe(cfg, said.append, cli_keys=[]) == {"optim.lr": 0.001} and "mosaic" not in cfg.data
    # a wrong key names the run's place of the group
    cfg = compose_config("train", [])
    OmegaConf.set_struct(cfg, False)
    cfg.model.recipe = {"mosaic/default": {"probability": 0}}
    with pytest.raises(ConfigError, match="data.mosaic.probability is not a key of default.yaml"):
        apply_recipe(cfg, said.append, cli_keys=[])


def test_the_detector_is_built_without_its_recipe():
    cfg = compose_config("train", ["model=fast_rcnn_cpu"])
    model = build_model(cfg.model, num_classes=3)
    plain = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k != "recipe"])
    torch.manual_seed(0)
    a = build_model(plain, num_classes=3)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in a.parameters())


@pytest.mark.parametrize("recipe, message", [
    ({"optim": {"lr": 1}}, "entry 'optim': expected '<group>/<option>"),
    ({"optim/lamb": {"lr": 1}}, "entry 'optim/lamb'"),
    ({"data/builtin": {"img_size": 1}}, "<group> one of optim, schedule, mosaic"),
    ({"optim/adamw": {"learning_rate": 1}}, "optim.learning_rate is not a key of adamw.yaml"),
])
def test_a_malformed_recipe_names_its_entry(recipe, message):
    cfg = compose_config("train", [])
    OmegaConf.set_struct(cfg, False)
    cfg.model.recipe = recipe
    with pytest.raises(ConfigError, match=message):
        apply_recipe(cfg, lambda text: None, cli_keys=[])
