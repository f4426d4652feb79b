"""YOLOv1 (Redmon et al. 2016): one network regresses an S×S grid of B boxes, their confidences and C class
probabilities per cell from the whole image, through two fully connected layers.

The convolutional trunk is the paper's 24 convs (7×7/2 stem, 1×1 reductions between 3×3 convs, four 2×2
max-pools and a strided 3×3, total stride 64), with leaky ReLU 0.1; batch norm follows every conv (the paper
predates it; YOLOv2 added it and it makes the net trainable without ImageNet pre-training). The FC head fixes the
number of input pixels, so a model is built for one ``input_size`` and rejects any other.

Two departures from the paper are for training the FC head from random init with AdamW at detkit's learning
rates (issue 7: yolov1_cpu ended at mAP@0.5 0.000 on the built-in data, its outputs almost the same for every
image). LayerNorm on the first FC's outputs (``fc_norm``): Adam moves every one of that FC's ``channels × cells``
weights by about the learning rate each step, which shifts its unnormalized pre-activations by far more than
their scale (yolov1_cpu at 256 px after 200 steps at lr 1e-3 without it: 4% of the hidden units positive, the
outputs varying 0.05 from image to image against 0.18 from cell to cell). And a last FC that starts at a prior
(:meth:`YOLOv1.reset_head`) instead of random outputs, so that the initial √w, √h are positive and the
confidences near 0.

``head="darknet"`` is darknet's yolov1.cfg instead (configs/model/yolov1_darknet.yaml, whose ``.weights`` load
with :mod:`detkit.convert.darknet`): a 3×3 locally connected layer (unshared kernels) with leaky ReLU, dropout and
one fully connected layer whose outputs come in darknet's ``[detection]`` order (:func:`darknet_to_cells`), decoded
as darknet decodes them.

``head="conv"`` (yolov1_cpu) replaces the fully connected readout by convolutions: a 3×3 conv of ``local_filters``
with batch norm and ``act`` (darknet's locally connected layer with one kernel shared by every cell), then a 1×1
conv to each cell's 5B + C outputs. The grid, the B predictors per cell and their encoding are the paper's
(yolov1_cpu also trains its classes by softmax cross-entropy: ``class_softmax``); what changes is that a cell's
predictions come from the features around it through weights every cell shares, not from the whole image through
weights of its own. On 4,000 images the FC head learned its cells' classes on the training images and stayed at
chance on val (README, "YOLO family"): each cell's own weights see a few hundred objects an epoch. The conv head
needs the trunk's output to be the grid: ``input_size / 64 == grid`` (``grid=None`` sets it so).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.losses.yolov1 import YOLOv1Loss
from detkit.models.detectors.common import check_targets, stack_images
from detkit.models.detectors.yolo import NMS_METHODS
from detkit.models.layers import ConvBNAct, LocallyConnected2d, activation
from detkit.postprocess import postprocess_detections

STRIDE = 64
HEADS = ("fc", "darknet", "conv")


def darknet_to_cells(output: Tensor, grid: int, num_boxes: int, num_classes: int) -> Tensor:
    """Darknet's ``[detection]`` layer input → detkit's per-cell layout.

    Args:
        output: (N, S·S·C + S·S·B + S·S·B·4): the C class values of every cell, then the B confidences of every
            cell, then the B (x, y, √w, √h) of every cell; cells in row-major order (row · S + column).

    Returns:
        (N, S, S, 5B + C) indexed [image, row, column]: per box (x, y, √w, √h, confidence), then the C classes.
    """
    n, s, b = len(output), grid, num_boxes
    probs, conf, coords = output.split([s * s * num_classes, s * s * b, s * s * b * 4], dim=1)
    boxes = torch.cat([coords.reshape(n, s, s, b, 4), conf.reshape(n, s, s, b, 1)], dim=-1)
    return torch.cat([boxes.flatten(3), probs.reshape(n, s, s, num_classes)], dim=-1)


def cells_to_darknet(cells: Tensor, num_boxes: int) -> Tensor:
    """Inverse of :func:`darknet_to_cells`: (N, S, S, 5B + C) → (N, S·S·C + S·S·B + S·S·B·4)."""
    n, b = len(cells), num_boxes
    boxes = cells[..., : 5 * b].reshape(n, -1, b, 5)
    return torch.cat([cells[..., 5 * b :].reshape(n, -1), boxes[..., 4].reshape(n, -1),
                      boxes[..., :4].reshape(n, -1)], dim=1)


def yolov1_trunk(width: float = 64, repeats: Sequence[int] = (4, 2), act: str = "leaky") -> tuple[nn.Sequential, int]:
    """The conv trunk and its output channels. ``width`` is the stem's channels (64 in the paper; every layer
    scales with it); ``repeats`` the (1×1, 3×3) pairs of the 4th and 5th blocks ((4, 2): 24 convs).
    Input (N, 3, H, W) → (N, c, H / 64, W / 64)."""

    def c(n: int) -> int:
        return max(1, round(n * width / 64))

    def pairs(count: int, reduce: int, expand: int, c_in: int) -> list[nn.Module]:
        layers = []
        for _ in range(count):
            layers += [ConvBNAct(c_in, c(reduce), 1, act=act), ConvBNAct(c(reduce), c(expand), 3, act=act)]
            c_in = c(expand)
        return layers

    pool = nn.MaxPool2d(2, 2)
    layers: list[nn.Module] = [ConvBNAct(3, c(64), 7, stride=2, act=act), pool]
    layers += [ConvBNAct(c(64), c(192), 3, act=act), pool]
    layers += pairs(1, 128, 256, c(192)) + pairs(1, 256, 512, c(256)) + [pool]
    layers += pairs(repeats[0], 256, 512, c(512)) + pairs(1, 512, 1024, c(512)) + [pool]
    layers += pairs(repeats[1], 512, 1024, c(1024))
    layers += [ConvBNAct(c(1024), c(1024), 3, act=act), ConvBNAct(c(1024), c(1024), 3, stride=2, act=act)]
    layers += [ConvBNAct(c(1024), c(1024), 3, act=act), ConvBNAct(c(1024), c(1024), 3, act=act)]
    return nn.Sequential(*layers), c(1024)


class YOLOv1(nn.Module):
    """YOLOv1 with the common detkit interface (see :class:`detkit.models.detectors.yolo.YOLOv3`).

    Args:
        num_classes: C. grid: S (7; None: ``input_size / 64``, the trunk's output side). num_boxes: B (2).
        input_size: the square input side the model is built for (448 in the paper); a multiple of 64.
        width, repeats, act: see :func:`yolov1_trunk`. fc_hidden: the first FC's width (4096). dropout: after it.
        fc_norm: LayerNorm on the first FC's outputs (not in the paper; see the module docstring).
        head: ``fc`` (the paper's two FCs: ``fc_hidden``, ``fc_norm``), ``darknet`` (yolov1.cfg's: a 3×3
            locally connected layer of ``local_filters`` with ``act``, ``dropout``, one FC in darknet's output
            order; ``fc_hidden`` and ``fc_norm`` are not used) or ``conv`` (a 3×3 conv-BN-``act`` of
            ``local_filters``, ``dropout``, a 1×1 conv; see the module docstring).
        coord_weight, noobj_weight, class_cells: λ_coord, λ_noobj and the cells whose class values train
            (``center``: the paper's; ``covered``) of :class:`detkit.losses.yolov1.YOLOv1Loss`; class_softmax:
            class values as softmax logits trained by cross-entropy (YOLOv2's) instead of regressed probabilities.
        score_thresh, nms_thresh, max_det, nms: inference; the score of class c for a box is
            Pr(c | object) · confidence, the confidence having been trained towards Pr(object) · IoU.

    Raw output: (N, S, S, 5B + C), per box (x in cell, y in cell, √(w/W), √(h/H), confidence), then C class
    values; linear, as in the paper. With ``head="darknet"`` inference decodes as darknet's detection layer
    does: w = (√w)² · W whatever the sign of √w, score = class value · confidence without clipping either.
    """

    def __init__(
        self,
        num_classes: int,
        grid: int | None = 7,
        num_boxes: int = 2,
        input_size: int = 448,
        width: float = 64,
        repeats: Sequence[int] = (4, 2),
        fc_hidden: int = 4096,
        dropout: float = 0.5,
        fc_norm: bool = True,
        act: str = "leaky",
        head: str = "fc",
        local_filters: int = 256,
        coord_weight: float = 5.0,
        noobj_weight: float = 0.5,
        class_cells: str = "center",
        class_softmax: bool = False,
        score_thresh: float = 0.001,
        nms_thresh: float = 0.5,
        max_det: int = 100,
        nms: str = "nms",
    ) -> None:
        super().__init__()
        if input_size % STRIDE:
            raise ValueError(f"YOLOv1's input_size must be a multiple of {STRIDE}, got {input_size}")
        if nms not in NMS_METHODS:
            raise ValueError(f"unknown nms {nms!r}; expected one of {', '.join(NMS_METHODS)}")
        if head not in HEADS:
            raise ValueError(f"unknown YOLOv1 head {head!r}; expected one of {', '.join(HEADS)}")
        side = input_size // STRIDE
        grid = side if grid is None else grid
        self.num_classes, self.grid, self.num_boxes, self.input_size = num_classes, grid, num_boxes, input_size
        self.backbone, channels = yolov1_trunk(width, repeats, act)
        outputs = grid * grid * (5 * num_boxes + num_classes)
        self.darknet_head, self.conv_head = head == "darknet", head == "conv"
        if self.conv_head and side != grid:
            raise ValueError(f"YOLOv1's conv head predicts one cell per trunk output: input_size / {STRIDE} must equal "
                             f"grid (or grid null), got input_size {input_size} (a {side}×{side} map) and grid {grid}")
        if self.conv_head:
            self.head = nn.Sequential(
                ConvBNAct(channels, local_filters, 3, act=act),
                nn.Dropout(dropout),
                nn.Conv2d(local_filters, 5 * num_boxes + num_classes, 1),
            )
        elif self.darknet_head:
            self.head = nn.Sequential(
                LocallyConnected2d(channels, local_filters, 3, (side, side), padding=1),
                activation(act),
                nn.Dropout(dropout),
                nn.Flatten(),
                nn.Linear(local_filters * side * side, outputs),
            )
        else:
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * side * side, fc_hidden),
                nn.LayerNorm(fc_hidden) if fc_norm else nn.Identity(),
                activation(act),
                nn.Dropout(dropout),
                nn.Linear(fc_hidden, outputs),
            )
        self.loss = YOLOv1Loss(num_classes, grid, num_boxes, coord_weight, noobj_weight, class_cells,
                               class_softmax)
        self.reset_head()
        self.score_thresh, self.nms_thresh, self.max_det, self.nms = score_thresh, nms_thresh, max_det, nms

    @torch.no_grad()
    def reset_head(self) -> None:
        """Start the last FC at a prior: every box centred in its cell with confidence 0, predictor k of B with
        √w = √h = 0.6 (k + 1) / (B + 1) (different sizes, so that the responsible-predictor choice is not a tie
        and the B predictors specialise), class values 1 / C; weights small (std 0.02 / √fan-in: outputs within
        ~0.02 of the prior)."""
        last = self.head[-1]
        nn.init.normal_(last.weight, std=0.02 / last.weight[0].numel() ** 0.5)
        prior = torch.zeros(self.grid, self.grid, 5 * self.num_boxes + self.num_classes)
        for k in range(self.num_boxes):
            root = 0.6 * (k + 1) / (self.num_boxes + 1)
            prior[..., 5 * k : 5 * k + 4] = torch.tensor([0.5, 0.5, root, root])
        prior[..., 5 * self.num_boxes :] = 1.0 / self.num_classes
        if self.conv_head:  # one bias per output channel: the prior is the same in every cell
            last.bias.copy_(prior[0, 0])
        else:
            last.bias.copy_(cells_to_darknet(prior[None], self.num_boxes)[0] if self.darknet_head else prior.flatten())

    def raw_outputs(self, images: Tensor) -> Tensor:
        """(N, S, S, 5B + C) raw predictions of (N, 3, input_size, input_size) images."""
        hidden = self.head[:-1](self.backbone(images))
        # The last FC stays float32 under autocast: the sum-squared loss on its outputs needs more than bf16.
        with torch.autocast(hidden.device.type, enabled=False):
            out = self.head[-1](hidden.float())
        if self.conv_head:
            return out.permute(0, 2, 3, 1).contiguous()
        if self.darknet_head:
            return darknet_to_cells(out, self.grid, self.num_boxes, self.num_classes)
        return out.view(len(images), self.grid, self.grid, 5 * self.num_boxes + self.num_classes)

    def forward(self, images: Tensor | Sequence[Tensor], targets: Sequence[dict] | None = None):
        x = stack_images(images)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ValueError(
                f"YOLOv1 is built for {self.input_size}×{self.input_size} inputs (its {self.grid}×{self.grid} "
                f"grid), got {tuple(x.shape[-2:])}; set data.img_size={self.input_size} (and no multiscale, "
                "data.test_size null or equal) or build the model with input_size equal to data.img_size"
            )
        output = self.raw_outputs(x)
        if self.training:
            check_targets(targets, len(x))
            return self.loss(output, targets, x.shape[-2:])
        return self.postprocess(output, x.shape[-2:])

    @torch.no_grad()
    def postprocess(self, output: Tensor, size: Sequence[int]) -> list[dict]:
        """Boxes (N, S·S·B, 4) and class-specific scores Pr(c | object) · confidence, then class-aware NMS."""
        n, s = output.shape[:2]
        boxes = output[..., : 5 * self.num_boxes].reshape(n, s, s, self.num_boxes, 5)
        probs = output[..., 5 * self.num_boxes :]
        if self.darknet_head:  # darknet squares √w, √h as they are and multiplies the raw values
            boxes = torch.cat([boxes[..., :2], boxes[..., 2:4].abs(), boxes[..., 4:]], dim=-1)
            conf = boxes[..., 4:5]
        else:
            probs = probs.float().softmax(dim=-1) if self.loss.class_softmax else probs.clamp(min=0)
            conf = boxes[..., 4:5].clamp(min=0)
        ys, xs = torch.meshgrid(torch.arange(s, device=output.device), torch.arange(s, device=output.device),
                                indexing="ij")
        cells = torch.stack([xs, ys], dim=-1).expand(n, s, s, 2)
        decoded = self.loss.decode_cells(boxes, cells, size).reshape(n, -1, 4)
        scores = conf * probs[..., None, :]
        return postprocess_detections(decoded, scores.reshape(n, -1, self.num_classes), self.score_thresh,
                                      self.nms_thresh, self.max_det, self.nms, image_size=tuple(size))
