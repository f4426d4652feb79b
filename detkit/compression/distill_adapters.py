"""What distillation reads from a detector: one small adapter per family, chosen by :func:`dense_adapter`.

An adapter registers forward hooks on a detector's head modules and, after a forward pass (the trainer's
for the student, :meth:`DenseAdapter.run` for the teacher), hands back :class:`DenseOutputs`: the maps the
head reads, every anchor's logits and decoded box, and the anchors (priors) themselves, all in the
detector's own anchor order. Families: YOLOv2/v3/v3-SPP/v4 (:class:`~detkit.models.detectors.yolo.YOLOv3`,
sigmoid objectness and classes) and SSD/SSDLite (:class:`~detkit.models.detectors.ssd.SSD`, softmax with a
background column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detkit.errors import UserError
from detkit.models.detectors.ssd import SSD
from detkit.models.detectors.yolo import YOLOv3

__all__ = ["DistillationError", "DenseOutputs", "DenseAdapter", "YOLOAdapter", "SSDAdapter", "dense_adapter",
           "check_same_layout"]


class DistillationError(UserError, ValueError):
    """A teacher and student that cannot be distilled together (the user's to fix)."""


@dataclass
class DenseOutputs:
    """One forward pass, seen anchor by anchor (N anchors over all levels, in the detector's order).

    features: per level (B, C_l, H_l, W_l), the maps the prediction head reads.
    logits: (B, N, K) class logits: K = C independent sigmoids (YOLO) or C + 1 softmax logits, column 0 the
        background (SSD).
    objectness: (B, N) objectness logits (sigmoid), or None for softmax heads.
    boxes: (B, N, 4) decoded boxes, xyxy input pixels.
    priors: (N, 4) the anchors the boxes are predicted from, xyxy input pixels.
    cells: (N,) long, each anchor's location in the concatenation of every level's row-major H_l·W_l cells.
    softmax: whether ``logits`` are a softmax over K (else K sigmoids).
    """

    features: list[Tensor]
    logits: Tensor
    objectness: Tensor | None
    boxes: Tensor
    priors: Tensor
    cells: Tensor
    softmax: bool


def _input_channels(module: nn.Module) -> int:
    """Input channels of the first convolution in ``module`` (its weights, so a pruned model reports its own)."""
    conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    return conv.weight.shape[1] * conv.groups


def _cells(sizes: list[tuple[int, int]], per_cell: list[int], cell_major: bool) -> Tensor:
    """(N,) global cell index of each anchor: per level, ``per_cell`` anchors at each of H·W cells, ordered
    cell-major ((H, W, A), SSD) or anchor-major ((A, H, W), YOLO)."""
    out, offset = [], 0
    for (h, w), k in zip(sizes, per_cell):
        cells = torch.arange(h * w) + offset
        out.append(cells.repeat_interleave(k) if cell_major else cells.repeat(k))
        offset += h * w
    return torch.cat(out)


class DenseAdapter:
    """Forward hooks on one detector; subclasses say where its head is and how to read it."""

    softmax = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.captured: dict = {}
        self.handles: list = []

    def layout(self) -> dict:
        """What must match between teacher and student for per-anchor losses (classes, anchors, strides)."""
        raise NotImplementedError

    def feature_channels(self) -> list[int]:
        """Channels of each level's map that the head reads."""
        raise NotImplementedError

    def run(self, images: Tensor) -> None:
        """Run the network part of the detector (no loss, no post-processing), filling the captures."""
        self.model.raw_outputs(images)

    def outputs(self, images: Tensor) -> DenseOutputs:
        """The captures of the latest forward pass on ``images`` (B, 3, H, W), then forgets them."""
        raise NotImplementedError

    def _take(self, key: str) -> list:
        if not self.captured.get(key):
            raise RuntimeError(f"no {type(self.model).__name__} forward pass was seen through its heads: the "
                               f"distillation hooks must be registered on the model that runs")
        return self.captured.pop(key)

    def _keep(self, key: str, index: int, value) -> None:
        slots = self.captured.setdefault(key, [])
        if index == 0:
            slots.clear()
        slots.append(value)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class YOLOAdapter(DenseAdapter):
    """:class:`~detkit.models.detectors.yolo.YOLOv3` (YOLOv2, v3, v3-SPP, v4): per level, the map entering
    the head (after SAM/DropBlock) and the prediction conv's (B, A·(5 + C), H, W) output, read as
    (tx, ty, tw, th, objectness, C class logits) per anchor in (A, H, W) order."""

    def __init__(self, model: YOLOv3) -> None:
        super().__init__(model)
        for level, head in enumerate(model.heads):
            self.handles.append(head[0].register_forward_pre_hook(
                lambda _m, args, level=level: self._keep("features", level, args[0])))
            self.handles.append(head[-1].register_forward_hook(
                lambda _m, _args, out, level=level: self._keep("raw", level, out)))

    def layout(self) -> dict:
        m = self.model
        return {"family": "YOLOv3", "num_classes": m.num_classes, "anchors": m.anchors.tolist(),
                "strides": list(m.strides)}

    def feature_channels(self) -> list[int]:
        return [_input_channels(head) for head in self.model.heads]

    def priors(self, sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
        """(N, 4) xyxy: each anchor shape centred on its cell, in (level, A, H, W) order."""
        out = []
        for (h, w), shapes, stride in zip(sizes, self.model.anchors, self.model.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            centres = (torch.stack([xs, ys], dim=-1).reshape(1, -1, 2).float() + 0.5) * stride  # (1, HW, 2)
            half = shapes.to(device)[:, None, :] / 2  # (A, 1, 2)
            out.append(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4))
        return torch.cat(out)

    def outputs(self, images: Tensor) -> DenseOutputs:
        m = self.model
        features, raw = self._take("features"), self._take("raw")
        num_anchors, width = m.anchors.shape[1], 5 + m.num_classes
        levels = []
        for out in raw:
            b, _, h, w = out.shape
            levels.append(out.view(b, num_anchors, width, h, w).permute(0, 1, 3, 4, 2))
        batch = images.shape[0]
        boxes = torch.cat([b.reshape(batch, -1, 4) for b in m.decode(levels)], dim=1)
        flat = torch.cat([o.reshape(batch, -1, width) for o in levels], dim=1)
        sizes = [tuple(o.shape[2:4]) for o in levels]
        return DenseOutputs(features, flat[..., 5:], flat[..., 4], boxes, self.priors(sizes, images.device),
                            _cells(sizes, [num_anchors] * len(sizes), cell_major=False).to(images.device),
                            softmax=False)


class SSDAdapter(DenseAdapter):
    """:class:`~detkit.models.detectors.ssd.SSD` (SSD300, SSDLite): the maps entering ``model.head`` and its
    (class logits, offsets) output, in (H, W, k) order per level, decoded against the default boxes."""

    softmax = True

    def __init__(self, model: SSD) -> None:
        super().__init__(model)
        self.handles.append(model.head.register_forward_hook(self._capture))

    def _capture(self, _module, args, out) -> None:
        self.captured["features"] = [list(args[0])]
        self.captured["raw"] = [out]

    def layout(self) -> dict:
        m = self.model
        return {"family": "SSD", "num_classes": m.num_classes, "priors": m.priors_config,
                "variances": list(m.variances)}

    def feature_channels(self) -> list[int]:
        return [_input_channels(conv) for conv in self.model.head.cls]

    def outputs(self, images: Tensor) -> DenseOutputs:
        m = self.model
        (features,), ((logits, deltas),) = self._take("features"), self._take("raw")
        sizes = [tuple(f.shape[-2:]) for f in features]
        priors = m.default_boxes(images.shape[-2:], sizes, images.device)
        batch, num = deltas.shape[:2]
        boxes = m.coder.decode(deltas.reshape(-1, 4), priors.repeat(batch, 1)).view(batch, num, 4)
        per_cell = [conv_out // m.head.num_logits for conv_out in (_output_channels(c) for c in m.head.cls)]
        return DenseOutputs(features, logits, None, boxes, priors,
                            _cells(sizes, per_cell, cell_major=True).to(images.device), softmax=True)


def _output_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def dense_adapter(model: nn.Module) -> DenseAdapter:
    """The adapter of ``model``'s family; other detectors are refused by class name."""
    if isinstance(model, YOLOv3):
        return YOLOAdapter(model)
    if isinstance(model, SSD):
        return SSDAdapter(model)
    raise DistillationError(f"distillation does not support {type(model).__name__}: it reads dense per-anchor "
                    f"predictions of YOLOv3 (YOLOv2/v3/v3-SPP/v4 configs) and SSD (SSD300/SSDLite) detectors")


def check_same_layout(teacher: DenseAdapter, student: DenseAdapter, family_only: bool = False) -> None:
    """Raise :class:`DistillationError` naming what differs when teacher and student are not of one family
    or (unless ``family_only``) do not predict the same anchors and classes; their widths may differ."""
    t, s = teacher.layout(), student.layout()
    if t["family"] != s["family"]:
        raise DistillationError(f"the teacher is a {type(teacher.model).__name__} and the student a "
                                f"{type(student.model).__name__}: distillation needs one detector family, with the "
                                f"same anchors and classes")
    different = [] if family_only else [k for k in sorted(set(t) | set(s)) if t.get(k) != s.get(k)]
    if different:
        detail = "; ".join(f"{k}: teacher {t.get(k)} vs student {s.get(k)}" for k in different)
        raise DistillationError(f"teacher and student ({type(student.model).__name__}) must share the head layout "
                                f"(same anchors and classes, so that each prediction has a counterpart) for "
                                f"distillation; they differ in {detail}")
