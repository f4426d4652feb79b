"""Every family's CPU-size config takes a user dataset (data=coco, sizes left null) at its defaults: the sizes
training chooses fit the model, and one optimizer step runs (a fixed-input model sets the sizes itself)."""

import pytest
import torch

from detkit.app.auto import fixed_input_sizes
from detkit.app.build import build_data_loader, build_dataset, build_model, eval_img_size
from detkit.app.errors import check_input_size
from detkit.errors import ConfigError
from tests.app.test_auto import run_auto, write_coco
from tests.conftest import compose_config

FAMILIES = ["yolov1_cpu", "yolov2_cpu", "yolov3_compact", "yolov3_cpu", "yolov3_spp_cpu", "yolov4_cpu", "ssd300",
            "ssd300_cpu", "ssdlite", "ssdlite_cpu", "fast_rcnn_cpu", "gcnn_cpu", "fpn_rcnn_cpu", "retinanet_cpu"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"), 4, (300, 340), (30, 80))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_a_step_on_a_user_dataset_at_its_defaults(coco, name):
    cfg = compose_config("train", [*coco, f"model={name}", "data.batch_size=2", "data.mosaic.prob=0"])
    run_auto(cfg)
    torch.manual_seed(0)
    loader = build_data_loader(build_dataset(cfg.data, "train", cfg.seed), cfg.data, train=True, seed=cfg.seed)
    model = build_model(cfg.model, 2, cfg.get("channel_spec")).train()
    check_input_size(model, cfg.data.img_size, "data.img_size")
    check_input_size(model, eval_img_size(cfg.data), "data.test_size")
    images, targets = next(iter(loader))
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_fixed_input_model_sets_the_sizes_on_the_builtin_data():
    # data=builtin's test_size interpolates data.img_size: reading the data files' defaults must not resolve it
    # (it once stopped `tools/train.py model=yolov1_cpu` with an InterpolationKeyError before any training)
    cfg = compose_config("train", ["model=yolov1_cpu", "data=builtin_large"])
    changed = fixed_input_sizes(cfg, [], log=lambda _: None)
    fixed = cfg.model.input_size
    assert changed == {"data.img_size": fixed} and cfg.data.img_size == cfg.data.test_size == fixed


def test_a_fixed_input_model_sets_the_sizes_unless_they_are_chosen(coco):
    cfg = compose_config("train", [*coco, "model=yolov1_cpu"])
    changed, log = run_auto(cfg)
    fixed = cfg.model.input_size
    assert cfg.data.img_size == cfg.data.test_size == fixed and changed["data.img_size"] == fixed
    assert f"takes {fixed} px inputs" in log
    model = build_model(cfg.model, 2)
    chosen = compose_config("train", [*coco, "model=yolov1_cpu", f"data.img_size={fixed + 64}"])
    run_auto(chosen)  # outside a Hydra app nothing is named on the command line; a value no config file has stays
    assert chosen.data.img_size == fixed + 64
    with pytest.raises(ConfigError, match="is built for 448 px inputs"):
        check_input_size(model, chosen.data.img_size, "data.img_size")
