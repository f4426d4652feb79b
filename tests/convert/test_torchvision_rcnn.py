"""torchvision's fasterrcnn_resnet50_fpn and retinanet_resnet50_fpn into detkit (detkit/convert/tv_rcnn.py): the
converted model gives torchvision's own detections on the same input tensor.

The torchvision models are built as their COCO_V1 builders build them before loading (FrozenBatchNorm2d, ε 0,
91 classes), with seeded random weights whose heads are scaled so that many detections pass the 0.05 threshold.
The N/A categories (and RetinaNet's background output) never score above 0.05 in trained COCO weights (never a
training target); here their biases are set low so that they do not either, since a COCO-80 model cannot report
them. Faster R-CNN's N/A logits still enter the softmax (detkit's ``background_logits``)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import detkit
from detkit.anchors import torchvision_anchors
from detkit.convert.coco import COCO80_IDS, COCO80_NAMES
from detkit.convert.darknet import ConvertError
from detkit.convert.tv_rcnn import convert_torchvision, detector_kind, fasterrcnn_state, resnet_state
from detkit.models.backbones.resnet import ResNet
from tests.conftest import CHECKOUT_ENV

ROOT = Path(__file__).resolve().parents[2]
NOT_COCO80 = [i for i in range(91) if i not in COCO80_IDS]  # background and the 10 N/A ids
PROPOSALS = 100  # RPN proposals per image on both sides (torchvision's 1000 only slow the CPU test down)


def _randomise_frozen_bn(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.eps = 0.0  # overwrite_eps(model, 0.0), as fasterrcnn/retinanet_resnet50_fpn do for COCO_V1


@torch.no_grad()
def torchvision_fasterrcnn(seed: int = 0) -> FasterRCNN:
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, 91, min_size=128, max_size=1333)
    _randomise_frozen_bn(model, seed)
    predictor = model.roi_heads.box_predictor
    torch.nn.init.normal_(predictor.cls_score.weight, std=0.3)
    torch.nn.init.normal_(predictor.bbox_pred.weight, std=0.05)
    predictor.cls_score.bias[NOT_COCO80[1:]] = -20.0  # N/A: no detections, but still in the softmax
    torch.nn.init.normal_(model.rpn.head.cls_logits.weight, std=0.05)
    torch.nn.init.normal_(model.rpn.head.bbox_pred.weight, std=0.05)
    model.rpn._post_nms_top_n["testing"] = PROPOSALS
    return model.eval()


@torch.no_grad()
def torchvision_retinanet(seed: int = 0) -> RetinaNet:
    torch.manual_seed(seed)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    model = RetinaNet(backbone, 91, min_size=128, max_size=1333)
    _randomise_frozen_bn(model, seed)
    head = model.head.classification_head
    torch.nn.init.normal_(head.cls_logits.weight, std=0.75)
    head.cls_logits.bias.view(9, 91)[:, NOT_COCO80] = -20.0
    torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def fasterrcnn(tmp_path_factory):
    """(torchvision model, checkpoint converted by tools/convert.py from its state-dict file)."""
    root = tmp_path_factory.mktemp("fasterrcnn")
    model = torchvision_fasterrcnn()
    torch.save(model.state_dict(), root / "fasterrcnn.pth")
    out = root / "fasterrcnn_detkit.pt"
    subprocess.run([sys.executable, "tools/convert.py", "source=torchvision", f"weights={root / 'fasterrcnn.pth'}",
                    "model=fpn_rcnn", f"out={out}", "img_size=128"], cwd=ROOT, check=True, capture_output=True,
                   env=CHECKOUT_ENV)
    return model, out


@pytest.fixture(scope="module")
def retinanet(tmp_path_factory):
    root = tmp_path_factory.mktemp("retinanet")
    model = torchvision_retinanet()
    torch.save(model.state_dict(), root / "retinanet.pth")
    return model, convert_torchvision(root / "retinanet.pth", root / "retinanet_detkit.pt", "retinanet", 128)


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.rand(3, 96, 130, generator=gen) for _ in range(2)]


@torch.no_grad()
def assert_same_detections(reference: torch.nn.Module, checkpoint: Path, min_size: int) -> None:
    """``reference``'s own detections vs the converted detkit model's on torchvision's resized, normalised
    tensor, both mapped back to the original image by torchvision's transform."""
    detector = detkit.load(checkpoint).model
    detector.image_mean.zero_()  # the input below is already normalised (by torchvision's transform)
    detector.image_std.fill_(1.0)
    if hasattr(detector, "rpn"):
        detector.rpn.post_nms_topk["test"] = PROPOSALS
    images = _images()
    reference.transform.min_size = (min_size,)
    expected = reference(images)
    batch, _ = reference.transform(images)
    h, w = batch.image_sizes[0]
    assert min(h, w) == min_size and batch.tensors.shape[-1] % 32 == 0 and w % 32 != 0  # detkit pads it again
    got = detector(batch.tensors[..., :h, :w])
    got = reference.transform.postprocess(got, batch.image_sizes, [tuple(im.shape[-2:]) for im in images])
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 10 and len(g["boxes"]) == len(e["boxes"])
        assert torch.equal(torch.tensor(COCO80_IDS)[g["labels"]], e["labels"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("min_size", [128, 160])
def test_converted_fasterrcnn_gives_torchvisions_detections(fasterrcnn, min_size):
    assert_same_detections(*fasterrcnn, min_size)


@pytest.mark.parametrize("min_size", [128, 160])
def test_converted_retinanet_gives_torchvisions_detections(retinanet, min_size):
    assert_same_detections(*retinanet, min_size)


def test_a_converted_checkpoint_loads_and_predicts(fasterrcnn):
    detector = detkit.load(fasterrcnn[1])
    assert detector.class_names == list(COCO80_NAMES) and detector.img_size == 128
    assert (detector.letterbox.mode, detector.letterbox.max_size) == ("shorter_side", 1333)  # torchvision's resize
    backbone = detector.model.backbone
    assert all(not p.requires_grad for p in [*backbone.stem.parameters(), *backbone.stages[0].parameters()])
    assert all(m.eps == 0.0 for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d))
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    (result,) = detector.predict(image, score_threshold=0.05)
    assert len(result["boxes"]) > 0 and result["boxes"].shape[1] == 4
    assert (result["boxes"][:, 2] <= 120).all() and (result["boxes"][:, 3] <= 90).all()
    assert set(result["names"]) <= set(COCO80_NAMES)
    stored = torch.load(fasterrcnn[1], weights_only=True)
    assert stored["converted_from"]["model"] == "fasterrcnn_resnet50_fpn"


def test_torchvision_anchor_layout_is_torchvisions_anchor_generator():
    # 160 × 224 padded input: P6 is 3 × 4, strides 53 and 56, not 64
    sizes = ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    features = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
    generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    maps = [torch.zeros(1, 1, h, w) for h, w in features]
    expected = generator(ImageList(torch.zeros(1, 3, 160, 224), [(150, 210)]), maps)[0]
    got = torch.cat(torchvision_anchors(features, (160, 224), sizes))
    assert torch.equal(got, expected)


def test_an_imagenet_resnet_loads_into_detkits_backbone():
    torch.manual_seed(0)
    reference = resnet18(weights=None).eval()
    backbone = ResNet(depth=18)
    backbone.load_state_dict(resnet_state(reference.state_dict()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        c5 = backbone.eval()(x)[-1]
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
    torch.testing.assert_close(c5, expected)
    with pytest.raises(ConvertError, match="head.weight"):
        resnet_state({"head.weight": torch.zeros(1)})


def test_files_that_are_not_torchvisions_coco_detectors_are_refused(tmp_path):
    with pytest.raises(ConvertError, match="neither torchvision's fasterrcnn"):
        detector_kind({"conv1.weight": torch.zeros(1)}, "resnet.pth")
    state = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(21, 1024), "rpn.head.cls_logits.weight": None}
    with pytest.raises(ConvertError, match="21 rows, not 1 × 91"):
        fasterrcnn_state(state)
    path = tmp_path / "retinanet_head.pth"
    torch.save({"head.classification_head.cls_logits.weight": torch.zeros(9 * 91, 256, 3, 3)}, path)
    with pytest.raises(ConvertError, match="retinanet_resnet50_fpn: convert it with model=retinanet"):
        convert_torchvision(path, tmp_path / "out.pt", "fpn_rcnn", 128)
    assert not (tmp_path / "out.pt").exists()
