import pytest
import torch
import torchvision
from hydra.errors import InstantiationException

from detkit.anchors import SSD300, ssd_default_boxes, ssd_prior_config
from detkit.app.build import build_model
from detkit.losses.multibox import match_priors
from detkit.models.backbones.mobilenet import MobileNetV2SSD, MobileNetV3SSD
from detkit.models.backbones.vgg import VGG16SSD, L2Norm
from detkit.models.detectors.ssd import SSD, boxes_per_cell
from tests.conftest import compose_config
from tests.models.overfit import assert_finds_the_boxes, overfit


def draw_batch(size: int, boxes: list[torch.Tensor], labels: list[torch.Tensor]):
    """``size``² grey images, one per entry of ``boxes``, each box a filled rectangle whose colour is its class
    (0 red, 1 green, 2 blue) → (images, targets)."""
    colors = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])
    images = torch.full((len(boxes), 3, size, size), 0.5)
    for i in range(len(boxes)):
        for (x1, y1, x2, y2), label in zip(boxes[i].int().tolist(), labels[i].tolist()):
            images[i, :, y1:y2, x1:x2] = colors[label][:, None, None]
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]


def toy_batch(size: int = 300):
    """Two ``size``² images, one coloured rectangle each (placed for 300 px, scaled); the colour is the class."""
    boxes = [torch.tensor([[40.0, 50.0, 160.0, 200.0]]) * size / 300,
             torch.tensor([[150.0, 90.0, 260.0, 170.0]]) * size / 300]
    return draw_batch(size, boxes, [torch.tensor([2]), torch.tensor([0])])


def tiny_ssd300(num_classes: int = 3) -> SSD:
    return SSD(num_classes, VGG16SSD(width=1 / 16))


def test_ssd300_maps_and_8732_priors():
    assert len(ssd_default_boxes(**SSD300)) == 8732
    assert boxes_per_cell(SSD300["aspect_ratios"]) == [4, 6, 6, 6, 4, 4]
    model = tiny_ssd300().eval()
    x = torch.rand(1, 3, 300, 300)
    maps = model.backbone(x)
    assert [m.shape[-1] for m in maps] == [38, 19, 10, 5, 3, 1]
    logits, deltas, priors = model.raw_outputs(x)
    assert logits.shape == (1, 8732, 4) and deltas.shape == (1, 8732, 4)
    assert torch.equal(priors, ssd_default_boxes(**SSD300))


def test_priors_follow_the_input_size():
    model = tiny_ssd300().eval()
    _, _, priors = model.raw_outputs(torch.rand(1, 3, 384, 384))
    sizes = [48, 24, 12, 6, 4, 2]
    assert len(priors) == sum(s * s * k for s, k in zip(sizes, [4, 6, 6, 6, 4, 4]))
    config = ssd_prior_config(SSD300, (384, 384), [(f, f) for f in sizes])
    assert config["steps"] == [(384 / f, 384 / f) for f in sizes]  # every map tiles the whole input
    assert config["min_sizes"][0] == pytest.approx(30 * 384 / 300)
    assert ssd_prior_config(SSD300, (300, 300), [(f, f) for f in SSD300["feature_sizes"]]) == SSD300
    with pytest.raises(ValueError, match="268"):
        model(torch.rand(1, 3, 256, 256))


def _shapes(priors: torch.Tensor) -> set:
    """The distinct (w, h) of default boxes (rounded to 1e-3 px)."""
    wh = priors[:, 2:] - priors[:, :2]
    return {tuple(v) for v in (wh * 1000).round().int().tolist()}


@pytest.mark.parametrize("relative", [False, True])
def test_prior_size_keeps_default_box_pixels_at_another_input(relative):
    # A network trained at 384 px learns offsets from boxes of 384 px's pixel sizes; evaluated at 480 with boxes
    # that grew with the input, it predicted every box 1.25x too large (README, "SSD's default boxes at another
    # input size"). With prior_size the sizes stay, the centres still tile the input.
    def build(prior_size):
        torch.manual_seed(0)
        if relative:
            return SSD(3, MobileNetV3SSD(width=0.25), priors={"scales": [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0],
                       "aspect_ratios": [[2, 3]] * 6, "clip": True}, prior_size=prior_size).eval()
        return SSD(3, VGG16SSD(width=1 / 16), priors=dict(SSD300, clip=False), prior_size=prior_size).eval()

    fixed, shared = build(384), build(None)
    at = lambda model, side: model.raw_outputs(torch.rand(1, 3, side, side))[2]  # noqa: E731
    assert torch.allclose(at(fixed, 384), at(shared, 384), atol=1e-3)  # the training size: as before
    big_fixed, big_shared = at(fixed, 480), at(shared, 480)
    assert _shapes(big_fixed) == _shapes(at(fixed, 384))
    assert min(w for w, _ in _shapes(big_shared)) == pytest.approx(
        1.25 * min(w for w, _ in _shapes(big_fixed)), rel=1e-4)
    first = big_fixed[0]  # cell (0, 0) of the first map, centred at half a step of the 480 px input
    step = 480 / fixed.backbone(torch.rand(1, 3, 480, 480))[0].shape[-1]
    assert torch.allclose((first[:2] + first[2:]) / 2, torch.tensor([step / 2, step / 2]), atol=1e-3)


@pytest.mark.parametrize("name", ["ssdlite_cpu", "ssd300_cpu", "ssdlite_mnv3"])
def test_ssd_configs_lay_out_default_boxes_at_the_training_size(name):
    for size in (384, 320):
        cfg = compose_config("train", [f"model={name}", f"data.img_size={size}"])
        assert build_model(cfg.model, num_classes=3).prior_size == size


def test_parameter_count_equals_torchvision_ssd300_vgg16():
    num_classes = 21  # torchvision counts the background
    ours = SSD(num_classes - 1, VGG16SSD())
    theirs = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)


def test_l2norm_scales_unit_vectors():
    norm = L2Norm(4, scale=20.0)
    out = norm(torch.randn(2, 4, 3, 3))
    assert torch.allclose(out.norm(dim=1), torch.full((2, 3, 3), 20.0), atol=1e-4)


def test_train_losses_and_eval_format():
    model = tiny_ssd300()
    images, targets = toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_box", "loss_cls"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    model.eval()
    out = model(list(images))
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    for det in out:
        assert det["boxes"].shape == (len(det["scores"]), 4) and len(det["scores"]) <= 200
        assert det["boxes"].dtype == torch.float32 and det["labels"].dtype == torch.long
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 300).all()
        assert (det["scores"] > 0.01).all() and (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["labels"].min() >= 0 and det["labels"].max() < 3  # background never returned


def test_dense_predictions_plus_postprocess_equal_eval_output():
    from detkit.postprocess import postprocess_detections

    torch.manual_seed(0)
    model = SSD(3, MobileNetV2SSD(width=0.25), SSD300 | {"image_size": 320}, separable_head=True).eval()
    images, _ = toy_batch(128)
    with torch.no_grad():
        boxes, scores = model.dense_predictions(images)
        expected = model(images)
    assert boxes.shape[:2] == scores.shape[:2] and scores.shape[-1] == 3
    got = postprocess_detections(boxes, scores, image_size=(128, 128), **model.postprocess_settings())
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_ssdlite_forward_backward():
    torch.manual_seed(0)
    model = SSD(3, MobileNetV2SSD(width=0.25), SSD300 | {"image_size": 320}, separable_head=True)
    images, targets = toy_batch(150)
    loss = sum(model(images, targets).values())
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.backbone.features[0][0].weight.grad.abs().sum() > 0
    model.eval()
    assert len(model(images)) == 2


def test_configs_build():
    for name, size in (("ssd300", 300), ("ssdlite", 320)):
        cfg = compose_config("train", [f"model={name}", f"data.img_size={size}", "model.backbone.width=0.125"])
        model = build_model(cfg.model, num_classes=5).eval()
        with torch.no_grad():
            logits, _, priors = model.raw_outputs(torch.rand(1, 3, size, size))
        assert logits.shape[-1] == 6
        assert len(priors) == (8732 if name == "ssd300" else sum(s * s * k for s, k in
                                                                 zip([20, 10, 5, 3, 2, 1], [4, 6, 6, 6, 4, 4])))


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny_ssd300()
    images, targets = toy_batch()
    overfit(model, images, targets, steps=25, lr=3e-3, shrink=0.5)
    assert_finds_the_boxes(model, images, targets)


def small_object_batch(size: int = 160):
    """Two ``size``² images with three small rectangles each (14-22 px: 9-14% of the side), class by colour."""
    boxes = [torch.tensor([[20.0, 24.0, 34.0, 46.0], [90.0, 60.0, 106.0, 80.0], [120.0, 118.0, 136.0, 136.0]]),
             torch.tensor([[50.0, 30.0, 66.0, 50.0], [100.0, 100.0, 114.0, 122.0], [30.0, 110.0, 48.0, 128.0]])]
    return draw_batch(size, boxes, [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])])


def test_mobilenet_v3_stride8_taps_the_expansion_before_c4_without_new_weights():
    torch.manual_seed(0)
    six, seven = MobileNetV3SSD(width=0.5).eval(), MobileNetV3SSD(width=0.5, stride8=True).eval()
    assert sum(p.numel() for p in six.parameters()) == sum(p.numel() for p in seven.parameters())
    seven.load_state_dict(six.state_dict())
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        a, b = six(x), seven(x)
    assert [m.shape[-1] for m in b] == [20, 10, 5, 3, 2, 1, 1]
    assert all(torch.equal(u, v) for u, v in zip(a, b[1:]))  # the other six maps are unchanged
    block = seven.features[seven.c3]
    assert block.block[1][0].stride == (2, 2)  # the block's depthwise conv halves the map
    with torch.no_grad():  # the tap is that block's expansion conv, run on the stride-8 map before it
        expected = block.block[0](seven.features[: seven.c3](x))
    assert b[0].shape[1] == seven.out_channels[0] and torch.equal(b[0], expected)


def test_mobilenet_v3_stride4_taps_the_expansion_before_the_stride8_block():
    torch.manual_seed(0)
    seven = MobileNetV3SSD(width=0.5, stride8=True).eval()
    eight = MobileNetV3SSD(width=0.5, stride8=True, stride4=True).eval()
    eight.load_state_dict(seven.state_dict())  # no new weights
    x = torch.rand(1, 3, 160, 160)
    with torch.no_grad():
        a, b = seven(x), eight(x)
    assert [m.shape[-1] for m in b] == [40, 20, 10, 5, 3, 2, 1, 1] and len(eight.out_channels) == 8
    assert all(torch.equal(u, v) for u, v in zip(a, b[1:]))
    block = eight.features[eight.c2]
    assert eight.c2 < eight.c3 and block.block[1][0].stride == (2, 2)
    with torch.no_grad():
        expected = block.block[0](eight.features[: eight.c2](x))
    assert b[0].shape[1] == eight.out_channels[0] and torch.equal(b[0], expected)


def test_mobilenet_v2_init_std_draws_every_conv_from_a_normal():
    torch.manual_seed(0)
    default, normal = MobileNetV2SSD(width=0.5), MobileNetV2SSD(width=0.5, init_std=0.03)
    convs = [m.weight for m in normal.modules() if isinstance(m, torch.nn.Conv2d)]
    flat = torch.cat([w.flatten() for w in convs])
    assert flat.std().item() == pytest.approx(0.03, rel=0.05) and flat.mean().abs() < 0.002
    stem = default.features[0][0].weight  # torchvision's Kaiming fan-out: std √(2 / (16·9)) at width 0.5
    assert stem.std().item() == pytest.approx((2 / (stem.shape[0] * 9)) ** 0.5, rel=0.2)


def test_ssdlite_cpu_has_a_stride8_level_of_small_boxes_and_overfits_small_objects():
    # BatchNorm momentum 0.1 instead of torchvision's 0.03, so that the running statistics eval mode uses forget their
    # initial values within the overfit's 100 steps (0.97^100 = 4.8% of them remain at 0.03, 0.9^100 < 0.01% at 0.1).
    cfg = compose_config("train", ["model=ssdlite_cpu", "model.backbone.width=0.25", "model.batch_norm.momentum=0.1",
                                   "data.img_size=160"])  # the default boxes' sizes are those of the training size
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    images, targets = small_object_batch()
    with torch.no_grad():
        maps = model.eval().backbone(images)
    model.train()
    assert model.matcher == "atss"  # the config's; SSD's IoU matcher overfits in test_overfits_a_tiny_batch
    assert [m.shape[-1] for m in maps] == [20, 10, 5, 3, 2, 1, 1]  # strides 8 ... at 160 px
    first = model.default_boxes((160, 160), [m.shape[-2:] for m in maps])[: 20 * 20 * 4]
    inside = (first[:, :2] > 0).all(dim=1) & (first[:, 2:] < 160).all(dim=1)  # not clipped at the border
    sides = (first[inside, 2:] - first[inside, :2]).prod(dim=1).sqrt()
    assert sides.min() == pytest.approx(8.0, abs=0.01) and sides.max() < 16  # 5% of the input, then √(8·16)
    overfit(model, images, targets, steps=100, lr=1e-2, shrink=0.1)
    assert_finds_the_boxes(model, images, targets)


def test_atss_matcher_adds_default_boxes_to_ssds_and_a_wrong_matcher_is_named():
    cfg = compose_config("train", ["model=ssdlite_cpu", "model.backbone.width=0.25"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    images, targets = small_object_batch()
    with torch.no_grad():
        x, _ = model.network_input(images)
        _, _, priors, level_sizes = model._level_outputs(x)
    assert sum(level_sizes) == len(priors)
    box, label = targets[0]["boxes"], targets[0]["labels"]
    iou_classes, _ = match_priors(priors, box, label, 0.5)
    atss_classes, _ = match_priors(priors, box, label, 0.5, "atss", level_sizes)
    assert (atss_classes > 0).sum() > (iou_classes > 0).sum()
    assert torch.equal(atss_classes[iou_classes > 0], iou_classes[iou_classes > 0])  # SSD's positives are kept
    losses = model.train()(images, targets)  # the config's atss matcher
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(InstantiationException, match="matcher must be one of"):
        build_model(compose_config("train", ["model=ssdlite_cpu", "model.matcher=atts"]).model, num_classes=3)
    with pytest.raises(ValueError, match="needs level_sizes"):
        match_priors(priors, box, label, 0.5, "atss")


def test_ssd300_cpu_has_batchnorm_everywhere_and_overfits_small_objects():
    cfg = compose_config("train", ["model=ssd300_cpu", "model.backbone.width=0.0625", "data.img_size=300"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 13 + 2 + 8 and len(norms) == len(convs)  # conv1_1 … conv5_3, fc6, fc7, conv8 … conv11
    plain = VGG16SSD(width=0.0625).eval()
    x = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        assert [m.shape for m in model.eval().backbone(x)] == [m.shape for m in plain(x)]  # conv4_3 kept in place
    images, targets = small_object_batch(300)
    overfit(model.train(), images, targets, steps=100, lr=1e-2, shrink=0.1)
    assert_finds_the_boxes(model, images, targets)


def test_ssdlite_trains_and_evaluates_through_the_trainer(tiny_builtin, tmp_path, recwarn):
    from detkit.app.train import train

    # tiny_train_config's overrides are YOLO's (backbone depths); the same tiny run, for SSDLite.
    cfg = compose_config("train", [
        "model=ssdlite", "model.backbone.width=0.25", f"data.builtin.root={tiny_builtin}", "data.builtin.num_train=24",
        "data.builtin.num_val=8", "data.builtin.min_size=96", "data.builtin.max_size=128",
        "data.builtin.workers=1", "data.img_size=96", "data.batch_size=8", "data.eval_batch_size=8",
        "augment@data.augment=ssd", "trainer.epochs=1", "trainer.log_every=1", "trainer.threads=1",
    ])
    metrics = train(cfg, tmp_path)
    assert 0 <= metrics["AP"] <= 1 and (tmp_path / "last.pt").is_file()
    # The trainer's default bf16 + channels_last once gave non-finite gradients in the extra layers.
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
