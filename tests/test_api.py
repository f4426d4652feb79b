"""The public Python API: detkit.train(overrides) → detkit.load(checkpoint) → Detector.predict/evaluate/export."""

import numpy as np
import pytest
import torch
from PIL import Image

import detkit


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
    tiny = tiny_overrides
    out = tmp_path_factory.mktemp("api")
    metrics = detkit.train([*tiny, "trainer.epochs=1", "eval.plots=false"], out_dir=out)
    return out, metrics


def test_train_then_load_predicts_on_arrays_paths_and_pil_images(trained, tiny_builtin):
    out, metrics = trained
    assert "AP" in metrics and (out / "last.pt").is_file()
    detector = detkit.load(out / "last.pt")
    assert len(detector.class_names) == 10 and detector.img_size == 128  # the run's evaluation size
    path = sorted((tiny_builtin / "images" / "val").iterdir())[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    from_array, from_path = detector.predict(image, score_threshold=0.0), detector.predict(path, score_threshold=0.0)
    assert len(from_array) == 1 and torch.equal(from_array[0]["boxes"], from_path[0]["boxes"])
    det = from_array[0]
    assert det["boxes"].shape[1] == 4 and len(det["scores"]) == len(det["labels"]) == len(det["names"])
    h, w = image.shape[:2]
    assert (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()  # image pixels
    both = detector.predict([image, Image.fromarray(image)], score_threshold=0.0, batch_size=1)
    assert len(both) == 2 and torch.allclose(both[1]["scores"], det["scores"])


def test_evaluate_reproduces_the_training_metrics(trained, tmp_path):
    out, metrics = trained
    again = detkit.load(out / "last.pt").evaluate(out_dir=tmp_path)
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-4)
    assert (tmp_path / "metrics.json").is_file()


def test_export_writes_an_onnx_graph_beside_a_sidecar(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    out, _ = trained
    path = detkit.load(out / "last.pt").export(tmp_path / "model.onnx")
    assert path.is_file() and path.with_suffix(".json").is_file()


def test_predict_refuses_what_is_not_an_image(trained):
    out, _ = trained
    detector = detkit.load(out / "last.pt")
    with pytest.raises(ValueError, match="image 0: .*H x W x 3 uint8 RGB"):
        detector.predict(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"image 1: .*got shape \(4, 4\)"):  # the list position is named
        detector.predict([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.uint8)])
