"""ONNX export of a detector's dense predictions, and onnxruntime inference with the PyTorch output format.

The exported graph holds the network and its box decoding: images (B, 3, H, W) float in [0, 1] →
``boxes`` (B, N, 4) xyxy input pixels and ``scores`` (B, N, C) per-class scores. Post-processing (score
threshold, top-k, class-aware NMS, cap) is the documented separate step
:func:`detkit.postprocess.postprocess_detections`, which :class:`OnnxDetector` applies with the model's own
settings, so it returns what ``model(images)`` returns. The batch dimension is dynamic; H and W are fixed at
export (letterbox inputs to that size, as evaluation does).

Detectors opt in by providing ``dense_predictions(images) -> (boxes, scores)`` and ``postprocess_settings()``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from detkit.postprocess import postprocess_detections

OPSET = 17


class _DenseGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.dense_predictions(images)


def export_onnx(model: nn.Module, path: str | Path, img_size: int, opset: int = OPSET) -> Path:
    """Write ``model``'s dense predictions at ``img_size`` × ``img_size`` to ``path`` (dynamic batch).

    A copy of the model is exported in eval mode on the CPU, in float32; ``path`` is written atomically.
    """
    if not hasattr(model, "dense_predictions"):
        raise TypeError(f"{type(model).__name__} has no dense_predictions(images); it cannot be exported yet")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # A copy: the exporter sets the wrapper's (and so the model's) train/eval mode around tracing, and a model
    # traced in train mode would both bake batch statistics into the graph and update its running stats.
    graph = _DenseGraph(copy.deepcopy(model).float().cpu()).eval()
    example = torch.zeros(1, 3, img_size, img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph, (example,), str(tmp), opset_version=opset, dynamo=False,
            input_names=["images"], output_names=["boxes", "scores"],
            dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}},
        )
    tmp.replace(path)
    return path


class OnnxDetector:
    """Run an exported detector with onnxruntime; ``detector(images)`` returns one dict per image with
    ``boxes`` (xyxy input pixels), ``scores`` and ``labels``, like the PyTorch model in eval mode.

    ``settings`` are :func:`postprocess_detections`' keyword arguments (the model's
    ``postprocess_settings()`` at export).
    """

    def __init__(self, path: str | Path, settings: dict | None = None, providers: list[str] | None = None) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.settings = dict(settings or {})

    def dense(self, images: Tensor) -> tuple[Tensor, Tensor]:
        boxes, scores = self.session.run(["boxes", "scores"], {"images": images.float().cpu().numpy()})
        return torch.from_numpy(boxes), torch.from_numpy(scores)

    def __call__(self, images: Tensor) -> list[dict[str, Tensor]]:
        boxes, scores = self.dense(images)
        return postprocess_detections(boxes, scores, image_size=tuple(images.shape[-2:]), **self.settings)


def export_checkpoint(checkpoint: str | Path, out: str | Path | None = None, img_size: int | None = None,
                      opset: int = OPSET) -> tuple[Path, dict]:
    """Export a training checkpoint (its deployed weights: the EMA when there was one) to ONNX, beside it by
    default, with a ``.json`` sidecar holding what inference needs: input size, post-processing settings, class
    names and dataset category ids. Returns (onnx path, sidecar dict) after checking onnxruntime against
    PyTorch on a random batch of 2 (``max_box_diff`` in the sidecar, pixels)."""
    import json

    from detkit.app.build import eval_img_size
    from detkit.app.evaluate import load_trained

    model, cfg, state = load_trained(checkpoint)
    img_size = int(img_size or eval_img_size(cfg.data))
    out = Path(out) if out else Path(checkpoint).with_suffix(".onnx")
    export_onnx(model, out, img_size, opset)
    settings = model.postprocess_settings()
    images = torch.rand(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_boxes, ref_scores = model.dense_predictions(images)
    boxes, scores = OnnxDetector(out, settings).dense(images)
    sidecar = {
        "img_size": img_size, "opset": opset, "postprocess": settings,
        "class_names": list(state["class_names"]), "label_to_category_id": list(state["label_to_category_id"]),
        "max_box_diff": float((boxes - ref_boxes).abs().max()),
        "max_score_diff": float((scores - ref_scores).abs().max()),
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return out, sidecar
