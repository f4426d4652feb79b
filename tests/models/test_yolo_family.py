"""YOLOv1–v4 built from their configs: shapes at two input sizes, images without objects, overfitting a
2-image batch (tiny configs), and one training step of the full-size ones."""

import pytest
import torch
from hydra.errors import InstantiationException

from detkit.app.build import build_model
from tests.conftest import compose_config
from tests.models.overfit import assert_finds_the_boxes, overfit

ANCHORED_TINY = ["yolov2_cpu", "yolov3_cpu", "yolov3_spp_cpu", "yolov4_cpu"]
# YOLOv1 is built for one input size. The paper's FC head is tested at the toy batch's 128 px with grid 4;
# yolov1_cpu's conv head has one cell per stride-64 trunk output, so its grid 4 needs 256 px (the batch upscaled).
V1_FC = ["model.input_size=128", "model.grid=4", "model.head=fc"]
V1_CONV = ["model.input_size=256"]


@pytest.fixture(autouse=True)
def one_thread():
    # Batches of 2 small images leave little to split between threads, and on a shared CPU extra threads only
    # wait for each other (measured: the yolov4_cpu overfit 38 s with 2 busy cores, 6 s with one thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, *overrides: str, num_classes: int = 3):
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={name}", *overrides])
    return build_model(cfg.model, num_classes)  # the trainer's: it sets a config's recipe aside


EMPTY = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2


@pytest.mark.parametrize("name", ANCHORED_TINY)
def test_anchored_shapes_at_two_sizes_and_finite_loss_without_objects(name):
    model = build(name)
    num_anchors, levels = model.anchors.shape[1], len(model.strides)
    for h, w in [(64, 96), (128, 128)]:
        outputs = model.raw_outputs(torch.zeros(2, 3, h, w))
        assert [tuple(o.shape) for o in outputs] == [(2, num_anchors, h // s, w // s, 8) for s in model.strides]
    assert levels == {"yolov2_cpu": 1, "yolov4_cpu": 3}.get(name, 2)  # yolov4_cpu: yolov3_compact's three scales
    losses = model(torch.rand(2, 3, 64, 64), EMPTY)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_obj"] > 0
    model.eval()
    dets = model(torch.rand(1, 3, 64, 96))
    assert set(dets[0]) == {"boxes", "scores", "labels"}


def test_yolov1_shapes_finite_loss_without_objects_and_input_size_check():
    model = build("yolov1_cpu", *V1_FC)
    assert model.raw_outputs(torch.zeros(2, 3, 128, 128)).shape == (2, 4, 4, 2 * 5 + 3)
    other = build("yolov1_cpu", "model.input_size=192", "model.head=fc", "model.grid=7")
    assert other.raw_outputs(torch.zeros(1, 3, 192, 192)).shape == (1, 7, 7, 13)
    # The conv head's grid is the trunk's output: input_size / 64 unless a grid is named, which must agree.
    for size in (192, 448):
        assert build("yolov1_cpu", f"model.input_size={size}").raw_outputs(
            torch.zeros(1, 3, size, size)).shape == (1, size // 64, size // 64, 13)
    with pytest.raises(InstantiationException, match="input_size / 64 must equal grid"):
        build("yolov1_cpu", "model.input_size=192", "model.grid=7")
    losses = model(torch.rand(2, 3, 128, 128), EMPTY)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_noobj"] > 0
    assert losses["loss_box"] == 0 and losses["loss_cls"] == 0
    with pytest.raises(ValueError, match="built for 128×128 inputs"):
        model(torch.zeros(1, 3, 192, 192), EMPTY)


def _overfit(model, images, targets, steps: int, lr: float, calibrate) -> None:
    overfit(model, images, targets, steps, lr, shrink=0.3)
    calibrate(model, images, targets)
    assert_finds_the_boxes(model, images, targets)


@pytest.mark.parametrize("name", ANCHORED_TINY)
def test_tiny_config_overfits_two_images(name, toy_batch, precise_batchnorm):
    _overfit(build(name), *toy_batch, steps=100, lr=0.01, calibrate=precise_batchnorm)


@pytest.mark.parametrize("head", ["fc", "conv"])
def test_yolov1_cpu_overfits_two_images(head, toy_batch, precise_batchnorm):
    images, targets = toy_batch
    if head == "conv":
        images = torch.nn.functional.interpolate(images, scale_factor=2.0)
        targets = [{"boxes": t["boxes"] * 2, "labels": t["labels"]} for t in targets]
    # Dropout is there to stop memorising; here memorising is the point.
    model = build("yolov1_cpu", *(V1_FC if head == "fc" else V1_CONV), "model.dropout=0")
    _overfit(model, images, targets, steps=100, lr=0.003, calibrate=precise_batchnorm)


@pytest.mark.parametrize("name,size", [("yolov3", 416), ("yolov4", 416), ("yolov4", 608)])
def test_full_size_config_trains_one_step(name, size):
    model = build(name, num_classes=20)
    images = torch.rand(1, 3, size, size)
    targets = [{"boxes": torch.tensor([[50.0, 60.0, 200.0, 300.0]]), "labels": torch.tensor([7])}]
    outputs = model.raw_outputs(images)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, size // s, size // s, 25) for s in (8, 16, 32)]
    losses = model.loss(outputs, model.decode(outputs), targets, model.anchors, model.strides)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
