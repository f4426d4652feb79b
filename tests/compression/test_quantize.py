"""Int8 PT2E static quantization of YOLOv3's backbone and neck: it runs, stays close to float32, and the heads
stay float."""

import os

import pytest
import torch
from torch import nn

pytest.importorskip("torchao", reason="int8 quantization needs the optional torchao package (detkit[quant])")

from detkit.compression.quantize import (  # noqa: E402
    convert_qat,
    output_agreement,
    prepare_qat,
    quantization_config,
    quantize_features,
)
from tests.compression.detector_fixtures import TARGETS, one_thread, tiny_yolo  # noqa: E402, F401


def centred(outputs):
    # the heads' biases are constant per channel: without removing them the correlation says nothing
    return [t - t.mean((0, 2, 3), keepdim=True) for t in outputs]


def quantized_ops(graph: nn.Module) -> int:
    return sum("quantize_per_tensor" in str(n.target) for n in graph.graph.nodes)


def test_ptq_int8_runs_and_agrees_with_float32():
    model = tiny_yolo()
    calibration = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    int8 = quantize_features(model, calibration)
    assert quantized_ops(int8.backbone) > 0 and quantized_ops(int8.neck) > 0
    assert isinstance(model.backbone, nn.Module) and not hasattr(model.backbone, "graph")  # original untouched
    assert all(isinstance(head[-1], nn.Conv2d) for head in int8.heads)  # output convs stay float
    images = torch.rand(2, 3, 96, 64)  # another size than calibration: the graphs are exported dynamic
    with torch.no_grad():
        features = model.neck(model.backbone(images)), int8.neck(int8.backbone(images))
        raw = model.raw_outputs(images), int8.raw_outputs(images)
        detections = int8(images)
    assert output_agreement(*features)["correlation"] >= 0.99
    agreement = output_agreement(centred(raw[0]), centred(raw[1]))
    assert agreement["correlation"] >= 0.99 and agreement["relative_rms"] > 0  # close, but really quantized
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.skipif(not os.environ.get("DETKIT_SLOW_TESTS"), reason="about 100 s: torchao's QAT conv-BN folding "
                    "exports 114 pattern graphs; run with DETKIT_SLOW_TESTS=1")
def test_qat_trains_with_fake_quantization_then_converts():
    model, images, targets = tiny_yolo(train=True), torch.rand(2, 3, 64, 64), TARGETS
    qat = prepare_qat(model, images)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    for _ in range(2):
        loss = sum(qat(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    int8 = convert_qat(qat)
    assert quantized_ops(int8.backbone) > 0
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for t in int8.raw_outputs(images))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="observer"):
        quantization_config("percentile")
    with pytest.raises(ValueError, match="none of the submodules"):
        quantize_features(nn.Sequential(nn.Conv2d(3, 3, 1)), [torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="calibration"):
        quantize_features(tiny_yolo(), [])
