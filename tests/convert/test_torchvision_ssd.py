"""torchvision's ssd300_vgg16 and ImageNet backbones into detkit (detkit/convert/tv_ssd.py): the converted model
gives torchvision's own detections, and converted backbone files give torchvision's features."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

import detkit
from detkit.anchors import ssd_relative_boxes
from detkit.convert.coco import COCO80_IDS, COCO80_NAMES
from detkit.convert.darknet import ConvertError
from detkit.convert.pretrained import PretrainedError
from detkit.convert.tv_ssd import TV_COCO_COLUMNS, convert_backbone, convert_torchvision_ssd, weights_normalization
from detkit.models.backbones.light import MobileNetV2, MobileNetV3
from detkit.models.backbones.mobilenet import MobileNetV2SSD
from detkit.models.backbones.vgg import VGG16SSD, VGG16Conv5
from detkit.postprocess import best_per_class, postprocess_detections
from tests.conftest import CHECKOUT_ENV, compose_config

ROOT = Path(__file__).resolve().parents[2]
UNUSED = [i for i in range(1, 91) if i not in COCO80_IDS]


def test_relative_default_boxes_are_torchvisions_at_two_input_sizes():
    generator = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    for (h, w), maps in [((300, 300), [38, 19, 10, 5, 3, 1]), ((272, 288), [(34, 36), (17, 18), 9, 5, 3, 1])]:
        maps = [(m, m) if isinstance(m, int) else m for m in maps]
        theirs = generator(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), [torch.zeros(1, 1, *m) for m in maps])[0]
        ours = ssd_relative_boxes((h, w), maps, generator.scales, generator.aspect_ratios, generator.steps)
        assert torch.equal(ours, theirs)  # same order, same float32 values
    wide, tall = ours[-2], ours[-1]  # the 1² map's (0.87·√2, 0.87/√2) box and its transpose: sides clamped to 1
    assert (wide[2] - wide[0]).item() == pytest.approx(288) and (tall[3] - tall[1]).item() == pytest.approx(272)


def test_per_class_top_k_keeps_each_classes_best():
    gen = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(500, generator=gen), torch.randint(0, 7, (500,), generator=gen)
    kept = best_per_class(scores, labels, 20)
    expected = torch.cat([(labels == c).nonzero().squeeze(1)[scores[labels == c].topk(20).indices] for c in range(7)])
    assert kept.tolist() == expected.sort().values.tolist()
    # in post-processing, a class with many strong boxes no longer crowds out the others' candidates
    boxes = torch.rand(1, 500, 2, generator=gen).mul(50).repeat(1, 1, 2) + torch.tensor([0.0, 0.0, 10.0, 10.0])
    one_hot = torch.nn.functional.one_hot(labels, 7).float()[None] * scores[None, :, None]
    limited = postprocess_detections(boxes, one_hot, 0.0, 1.0, 500, pre_nms_topk=10**6, class_topk=20)[0]
    assert torch.bincount(limited["labels"]).tolist() == [20] * 7


def _calibrated_torchvision_ssd(seed: int = 0):
    """torchvision's ssd300_vgg16 with random weights (seeded), eval mode; head convs rescaled on one image so
    that class logits and offsets have unit spread (untouched, 0-255 input saturates the softmax into ties at
    1.0), a background bias of 1, and the 10 unused category slots at a constant logit log(0.5): never a
    detection above 0.01, yet ~3% of the softmax's mass, so dropping them from the softmax would show."""
    torch.manual_seed(seed)
    model = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        batch, _ = model.transform([torch.rand(3, 300, 300)])
        features = list(model.backbone(batch.tensors).values())
        heads = model.head.classification_head.module_list, model.head.regression_head.module_list
        for convs in heads:
            for conv, f in zip(convs, features):
                conv.weight.div_(conv(f).std())
        for conv in heads[0]:
            weight, bias = conv.weight.view(-1, 91, *conv.weight.shape[1:]), conv.bias.view(-1, 91)
            bias[:, 0] = 1.0
            weight[:, UNUSED], bias[:, UNUSED] = 0.0, math.log(0.5)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torchvision's model, the detkit checkpoint tools/convert.py wrote from its state dict file)."""
    tmp = tmp_path_factory.mktemp("tvssd")
    model = _calibrated_torchvision_ssd()
    torch.save(model.state_dict(), tmp / "ssd300_vgg16.pth")
    out = tmp / "ssd300_coco.pt"
    subprocess.run([sys.executable, "tools/convert.py", "source=torchvision", f"weights={tmp / 'ssd300_vgg16.pth'}",
                    "model=ssd300", f"out={out}"], cwd=ROOT, check=True, capture_output=True,
                   env=CHECKOUT_ENV)
    return model, out


def _assert_same_detections(ours: dict, theirs: dict) -> None:
    assert len(theirs["boxes"]) > 50 and set(theirs["labels"].tolist()).isdisjoint(UNUSED)
    assert [COCO80_IDS[i] for i in ours["labels"].tolist()] == theirs["labels"].tolist()
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)


def test_the_converted_ssd300_gives_torchvisions_detections(converted):
    theirs_model, path = converted
    ours_model = detkit.load(path).model
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 240, 320, generator=gen), torch.rand(3, 333, 250, generator=gen)]  # resized to 300²
    with torch.no_grad():
        for ours, theirs in zip(ours_model(images), theirs_model(images)):
            _assert_same_detections(ours, theirs)
        # another network size, not square: torchvision's fixed_size is (W, H), detkit's resize_to (H, W)
        theirs_model.transform.fixed_size = (288, 272)
        ours_model.resize_to = (272, 288)
        image = [torch.rand(3, 200, 260, generator=gen)]
        try:
            _assert_same_detections(ours_model(image)[0], theirs_model(image)[0])
        finally:
            theirs_model.transform.fixed_size = (300, 300)


def test_the_checkpoint_predicts_through_detkit_load_and_writes_coco_ids(converted, tmp_path):
    theirs_model, path = converted
    detector = detkit.load(path)
    stored = torch.load(path, weights_only=True)
    assert stored["converted_from"]["model"] == "ssd300_vgg16" and stored["config"]["model"]["extra_logits"] == 10
    assert detector.img_size == 300 and detector.class_names == list(COCO80_NAMES)
    assert detector.letterbox.mode == "stretch"  # torchvision resizes to 300 x 300 whatever the aspect ratio
    pixels = np.random.default_rng(2).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    ours = detector.predict(pixels, score_threshold=0.0)[0]
    with torch.no_grad():
        theirs = theirs_model([torch.from_numpy(pixels).permute(2, 0, 1).float() / 255])[0]
    _assert_same_detections(ours, theirs)
    assert ours["names"][0] == COCO80_NAMES[int(ours["labels"][0])]
    # evaluated on COCO-format data (this image, lossless), its predictions carry COCO's own category ids
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img" / "0.png")
    categories = [{"id": cid, "name": name} for cid, name in zip(COCO80_IDS, COCO80_NAMES)]
    box = {"id": 1, "image_id": 1, "category_id": 90, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0}
    (tmp_path / "val.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "0.png", "width": 300,
                                                                "height": 300}],
                                                    "annotations": [box], "categories": categories}))
    cfg = OmegaConf.to_container(compose_config("train", [
        "data=coco", f"data.val_json={tmp_path / 'val.json'}", f"data.val_images={tmp_path / 'img'}",
        "data.train_json=null", "data.train_images=null"]).data, resolve=True)
    detector.evaluate(data=cfg, out_dir=tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    best = max(written, key=lambda p: p["score"])
    assert best["category_id"] == COCO80_IDS[int(ours["labels"][0])] == int(theirs["labels"][0])
    assert best["score"] == pytest.approx(float(theirs["scores"][0]), abs=1e-4)
    assert {p["category_id"] for p in written} <= set(COCO80_IDS)


def test_a_file_of_another_model_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v2(weights=None).state_dict()
    torch.save(state, tmp_path / "mnv2.pth")
    with pytest.raises(ConvertError, match=r"mnv2.pth: not torchvision's ssd300_vgg16 \(entries of no SSD300"):
        convert_torchvision_ssd(tmp_path / "mnv2.pth", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    assert TV_COCO_COLUMNS[:3] == (0, 1, 2) and TV_COCO_COLUMNS[81:] == tuple(UNUSED)


def _randomized_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode with BatchNorm statistics that are not the identity, as trained ones are not."""
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _taps(features: torch.nn.Sequential, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    out = []
    for i, layer in enumerate(features):
        x = layer(x)
        if i in layers:
            out.append(x)
    return out


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"])
def test_a_converted_mobilenet_file_gives_torchvisions_features(arch, tmp_path):
    torch.manual_seed(0)
    classifier = _randomized_bn(getattr(torchvision.models, arch)(weights=None))
    torch.save(classifier.state_dict(), tmp_path / "tv.pth")
    path = convert_backbone(tmp_path / "tv.pth", arch, tmp_path / "features.pth")
    assert all(k.startswith("features.") for k in torch.load(path, weights_only=True))
    ours = (MobileNetV2(pretrained=str(path)) if arch == "mobilenet_v2" else
            MobileNetV3(arch.rsplit("_", 1)[1], pretrained=str(path))).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for mine, theirs in zip(ours(x), _taps(classifier.features, x, ours.taps)):
            torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    if arch == "mobilenet_v2":
        ssd = MobileNetV2SSD(pretrained=str(path))
        assert torch.equal(ssd.features[-1][0].weight, classifier.features[-1][0].weight)
    else:
        other = "large" if arch.endswith("small") else "small"
        with pytest.raises(PretrainedError, match="not this architecture's weights"):
            MobileNetV3(other, pretrained=str(path))


def test_vgg16_features_convert_from_a_weights_name_and_load_into_both_vgg_backbones(monkeypatch, tmp_path):
    torch.manual_seed(0)
    tv_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    # IMAGENET1K_FEATURES: valid features, a classifier of NaN, 0-255 input with the Caffe VGG's mean
    state = {f"features.{k}": v for k, v in tv_features.state_dict().items()}
    state["classifier.0.weight"] = torch.full((4, 4), float("nan"))
    transforms = functools.partial(object, mean=(0.48235, 0.45882, 0.40784), std=(1 / 255,) * 3)
    weights = type("Weights", (), {"transforms": transforms, "get_state_dict": lambda self, **kw: state})()
    asked = []
    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: asked.append(name) or weights)
    path = convert_backbone("VGG16_Weights.IMAGENET1K_FEATURES", "vgg16", tmp_path / "vgg16.pth")
    assert asked == ["VGG16_Weights.IMAGENET1K_FEATURES"]
    assert weights_normalization("VGG16_Weights.IMAGENET1K_FEATURES") == ([0.48235, 0.45882, 0.40784], [1 / 255] * 3)
    assert weights_normalization(path) is None
    saved = torch.load(path, weights_only=True)
    assert "classifier.0.weight" not in saved and not any(v.isnan().any() for v in saved.values())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        torch.testing.assert_close(VGG16Conv5(pretrained=str(path))(x)[0], tv_features[:30](x), atol=0, rtol=0)
    ssd = VGG16SSD(pretrained=str(path))
    assert torch.equal(ssd.features[28].weight, tv_features[28].weight)


def test_vgg16_bn_features_load_into_the_batchnorm_vgg_of_ssd300(tmp_path):
    torch.manual_seed(0)
    tv_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True).eval()
    for module in tv_features.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "vgg16_bn.pth"
    # as torchvision's vgg16_bn file (2017): no BatchNorm num_batches_tracked entries
    torch.save({f"features.{k}": v for k, v in tv_features.state_dict().items() if "num_batches" not in k}, path)
    ssd = VGG16SSD(pretrained=str(path), batch_norm=True).eval()
    x = torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(4))
    tv_features[23].ceil_mode = True  # pool3, as SSD rounds it up
    with torch.no_grad():
        conv4_3 = tv_features[:33](x)  # vgg16_bn's conv4_3 ReLU is its layer 32
        torch.testing.assert_close(ssd(x)[0], ssd.l2norm(conv4_3), atol=0, rtol=0)
    with pytest.raises(PretrainedError, match="not this architecture's weights"):
        VGG16SSD(pretrained=str(path))  # the plain VGG's layer indices are not vgg16_bn's


def test_resize_to_resizes_images_and_training_boxes_and_maps_detections_back():
    from detkit.app.build import build_model

    torch.manual_seed(0)
    model = build_model(compose_config("train", ["model=ssdlite", "model.backbone.width=0.25",
                                                 "model.resize_to=[96,96]", "model.score_thresh=0.0"]).model, 3)
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(6))
    assert model.network_input([image])[0].shape == (1, 3, 96, 96)
    plain = build_model(compose_config("train", ["model=ssdlite", "model.backbone.width=0.25",
                                                 "model.score_thresh=0.0", "data.img_size=96"]).model, 3)
    plain.load_state_dict(model.state_dict())
    stretched = torch.nn.functional.interpolate(image[None], size=(96, 96), mode="bilinear", align_corners=False)
    scale = torch.tensor([80 / 96, 64 / 96, 80 / 96, 64 / 96])
    model.eval(), plain.eval()
    with torch.no_grad():
        ours, reference = model([image])[0], plain(stretched)[0]
    assert len(ours["boxes"]) > 0
    torch.testing.assert_close(ours["boxes"], reference["boxes"] * scale, atol=1e-3, rtol=0)
    torch.testing.assert_close(ours["scores"], reference["scores"], atol=1e-5, rtol=0)
    model.train(), plain.train()  # two images of two sizes: each one's boxes scaled with it
    second = torch.rand(3, 72, 60, generator=torch.Generator().manual_seed(7))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 4.0, 58.0, 30.0]]), "labels": torch.tensor([2])}]
    scales = [scale, torch.tensor([60 / 96, 72 / 96, 60 / 96, 72 / 96])]
    batch = torch.cat([stretched, torch.nn.functional.interpolate(second[None], size=(96, 96), mode="bilinear",
                                                                  align_corners=False)])
    ours = model([image, second], targets)
    reference = plain(batch, [dict(t, boxes=t["boxes"] / s) for t, s in zip(targets, scales)])
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-4, rtol=1e-4)
