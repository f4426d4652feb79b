import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.app.build import build_model
from detkit.app.train import train
from detkit.deploy.onnx import OnnxDetector, export_onnx
from tests.conftest import compose_config

pytest.importorskip("onnxruntime")
ROOT = Path(__file__).resolve().parents[2]


def tiny_default_model():
    torch.manual_seed(0)
    cfg = compose_config("train", ["model.backbone.width=8", "model.backbone.depths=[1,1,1,1]"])
    model = build_model(cfg.model, 10).eval()
    with torch.no_grad():  # spread the scores, so that the ranking has no near-ties for float rounding to flip
        for head in model.heads:
            head[-1].weight.normal_(std=0.3)
            head[-1].bias.normal_(std=2.0)
    return model


def assert_same_detections(ours: list[dict], reference: list[dict]) -> None:
    assert len(ours) == len(reference)
    for got, want in zip(ours, reference):
        assert torch.equal(got["labels"], want["labels"])
        assert torch.allclose(got["boxes"], want["boxes"], atol=1e-3)
        assert torch.allclose(got["scores"], want["scores"], atol=1e-4)


def test_onnxruntime_gives_the_pytorch_detections_for_any_batch_size(tmp_path):
    model = tiny_default_model()
    path = export_onnx(model, tmp_path / "model.onnx", img_size=96)
    detector = OnnxDetector(path, model.postprocess_settings())
    for batch in (1, 3):
        images = torch.rand(batch, 3, 96, 96, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            reference = model(images)
        assert sum(len(r["boxes"]) for r in reference) > 10  # an untrained head scores above the 0.001 floor
        assert_same_detections(detector(images), reference)


def test_export_tool_writes_the_graph_and_its_sidecar(tiny_train_config, tmp_path):
    train(tiny_train_config("trainer.epochs=1", "trainer.eval_every=9"), tmp_path / "run")
    checkpoint = tmp_path / "run" / "last.pt"
    result = subprocess.run([sys.executable, "tools/export.py", f"checkpoint={checkpoint}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    # the evaluation size of the built-in data (96 x 1.25 to a multiple of 32), not the training size
    assert sidecar["img_size"] == 128 and sidecar["max_box_diff"] < 1e-3
    assert len(sidecar["class_names"]) == len(sidecar["label_to_category_id"]) == 10
    assert "max box diff" in result.stdout and checkpoint.with_suffix(".onnx").is_file()


def test_export_refuses_an_unknown_format(tmp_path):
    result = subprocess.run([sys.executable, "tools/export.py", f"checkpoint={tmp_path / 'x.pt'}", "format=tflite"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "format must be one of onnx, got 'tflite'" in result.stderr
