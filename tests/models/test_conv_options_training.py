"""One training step of a CPU detector config with each backbone / RoI-head option on (deformable stages,
IGC blocks, deformable RoI pooling): finite losses, gradients in the new layers (the offsets start at zero but
must be able to learn), and evaluation still returns detections."""

import pytest
import torch

from detkit.models.deformable import DeformableConv2d, DeformableRoIPooler
from detkit.models.igc import InterleavedGroupConv
from tests.models.roi_common import build, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = [
    ("yolov3_cpu", ["model.backbone.deform_stages=[3,4]"], DeformableConv2d),
    ("yolov4_cpu", ["model.backbone.deform_stages=[3]"], DeformableConv2d),
    ("yolov3_cpu", ["model.backbone.block=igc"], InterleavedGroupConv),
    ("fpn_rcnn_cpu", ["model.backbone.deform_stages=[3]"], DeformableConv2d),
    ("fpn_rcnn_cpu", ["model.deformable_roi=true"], DeformableRoIPooler),
    ("fast_rcnn_cpu", ["model.deformable_roi=true", "model.pooler=roi_align"], DeformableRoIPooler),
    ("gcnn_cpu", ["model.deformable_roi=true", "model.pooler=roi_align", "model.train_steps=1",
      "model.test_steps=1"],
     DeformableRoIPooler),
]


def new_layer_gradients(layer) -> list[torch.Tensor]:
    params = layer.offset.parameters() if hasattr(layer, "offset") else layer.parameters()
    return [p.grad for p in params]


@pytest.mark.parametrize("name,overrides,layer_type", OPTIONS,
                         ids=[f"{n}-{o[0].split('.')[-1]}" for n, o, _ in OPTIONS])
def test_one_training_step_with_the_option(name, overrides, layer_type, toy_batch):
    images, targets = toy_batch
    model = build(name, *overrides)
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    assert layers
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sum(losses.values()).backward()
    grads = [g for layer in layers for g in new_layer_gradients(layer)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    optimizer.step()
    if layer_type is not InterleavedGroupConv:
        assert any(layer.offset.weight.any() for layer in layers)  # the offsets moved off zero
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and all(d["boxes"].shape[1] == 4 for d in detections)
