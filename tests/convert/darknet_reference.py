"""An independent reference for darknet's layer semantics, for the converter's tests: a cfg writer for YOLOv3
at any width/depth and a small interpreter that reads a cfg and a ``.weights`` file its own way and runs the
network as darknet does (convolutional with BN ε 1e-5 and leaky 0.1, shortcut, route, upsample, maxpool with
darknet's padding, reorg, yolo, region), and a yolov2.cfg writer with darknet's [region] decoding. Nothing here
imports detkit."""

from __future__ import annotations

import struct

import numpy as np
import torch
import torch.nn.functional as F


def yolov3_cfg(width: int, depths: list[int], num_classes: int, num_anchors: int = 3, spp: bool = False) -> str:
    """yolov3.cfg's layer sequence with stem ``width`` and stage ``depths`` (Darknet-53: 32, [1, 2, 8, 8, 4]);
    ``spp``: yolov3-spp.cfg's (three convs, max-pools 5, 9, 13 routed largest first, three convs)."""
    layers: list[str] = ["[net]\nwidth=416\nheight=416\nchannels=3"]

    def add(text: str) -> int:
        layers.append(text)
        return len(layers) - 2  # darknet numbers layers from 0, after [net]

    def conv(filters: int, size: int, stride: int = 1, bn: bool = True, act: str = "leaky") -> int:
        return add(f"[convolutional]\nbatch_normalize={int(bn)}\nfilters={filters}\nsize={size}\nstride={stride}\n"
                   f"pad=1\nactivation={act}")

    conv(width, 3)
    stage_outputs = []
    for i, depth in enumerate(depths):
        channels = 2 * width * 2**i
        last = conv(channels, 3, 2)
        for _ in range(depth):
            conv(channels // 2, 1)
            conv(channels, 3)
            last = add("[shortcut]\nfrom=-3\nactivation=linear")
        stage_outputs.append(last)
    outputs = 5 + num_classes
    levels = 3
    for level in range(levels):  # deepest first
        mid = 2 * width * 2 ** (len(depths) - 1 - level) // 2
        conv(mid, 1)
        conv(2 * mid, 3)
        conv(mid, 1)
        if spp and level == 0:
            add("[maxpool]\nstride=1\nsize=5")
            add("[route]\nlayers=-2")
            add("[maxpool]\nstride=1\nsize=9")
            add("[route]\nlayers=-4")
            add("[maxpool]\nstride=1\nsize=13")
            add("[route]\nlayers=-1,-3,-5,-6")
            conv(mid, 1)
        conv(2 * mid, 3)
        set_out = conv(mid, 1)
        conv(2 * mid, 3)
        conv(num_anchors * outputs, 1, bn=False, act="linear")
        add("[yolo]")
        if level < levels - 1:
            add(f"[route]\nlayers={set_out}")
            conv(mid // 2, 1)
            add("[upsample]\nstride=2")
            add(f"[route]\nlayers=-1,{stage_outputs[len(depths) - 2 - level]}")
    return "\n\n".join(layers) + "\n"


YOLOV2_COCO_ANCHORS = (0.57273, 0.677385, 1.87446, 2.06253, 3.33843, 5.47434, 7.88282, 3.52778, 9.77052, 9.16828)


def yolov2_cfg(width: int, num_classes: int, anchors: tuple[float, ...] = YOLOV2_COCO_ANCHORS) -> str:
    """yolov2.cfg's layer sequence with first-conv ``width`` (yolov2.cfg: 32, so 1024 = 32·width and the reorg's
    64 = 2·width) and its [region] layer (``anchors`` in grid cells, w h pairs; softmax classes)."""
    layers: list[str] = ["[net]\nwidth=608\nheight=608\nchannels=3"]

    def conv(filters: int, size: int, bn: bool = True, act: str = "leaky") -> int:
        layers.append(f"[convolutional]\nbatch_normalize={int(bn)}\nfilters={filters}\nsize={size}\nstride=1\n"
                      f"pad=1\nactivation={act}")
        return len(layers) - 2  # darknet numbers layers from 0, after [net]

    for i, depth in enumerate([1, 1, 2, 2, 3, 3]):  # Darknet-19: 3×3 convs with 1×1 halvings between them
        if i:
            layers.append("[maxpool]\nsize=2\nstride=2")
        channels = width * 2**i
        fine = conv(channels, 3)
        for _ in range(depth - 1):
            conv(channels // 2, 1)
            fine = conv(channels, 3)
        if i == 4:
            stride16 = fine
    conv(32 * width, 3)
    conv(32 * width, 3)
    layers.append(f"[route]\nlayers={stride16 - (len(layers) - 1)}")
    conv(2 * width, 1)
    layers.append("[reorg]\nstride=2")
    layers.append("[route]\nlayers=-1,-4")
    conv(32 * width, 3)
    num = len(anchors) // 2
    conv(num * (5 + num_classes), 1, bn=False, act="linear")
    layers.append(f"[region]\nanchors={','.join(map(str, anchors))}\nbias_match=1\nclasses={num_classes}\n"
                  f"coords=4\nnum={num}\nsoftmax=1")
    return "\n\n".join(layers) + "\n"


def region_decode(x: torch.Tensor, region: dict, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Darknet's [region] layer (softmax=1) on its input ``x`` (B, num·(5 + classes), H, W), as
    get_region_box and get_region_detections read it: a box centre (column + σ(tx)) / W of the image width, its
    width anchor·e^{tw} / W (anchor in cells), likewise in y; a class's probability σ(objectness)·softmax(classes).

    Returns boxes (B, N, 4) xyxy pixels of an image of size ``image_hw`` and probabilities (B, N, classes), N in
    the order of darknet's output memory: anchor, row, column."""
    anchors = torch.tensor([float(v) for v in region["anchors"].split(",")]).view(-1, 2)
    num, classes = int(region["num"]), int(region["classes"])
    b, _, h, w = x.shape
    p = x.view(b, num, 5 + classes, h, w)
    img_h, img_w = image_hw
    column, row = torch.arange(w).view(1, 1, 1, w), torch.arange(h).view(1, 1, h, 1)
    cx = (column + torch.sigmoid(p[:, :, 0])) / w * img_w
    cy = (row + torch.sigmoid(p[:, :, 1])) / h * img_h
    bw = torch.exp(p[:, :, 2]) * anchors[:, 0].view(1, num, 1, 1) / w * img_w
    bh = torch.exp(p[:, :, 3]) * anchors[:, 1].view(1, num, 1, 1) / h * img_h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1).reshape(b, -1, 4)
    probs = torch.sigmoid(p[:, :, 4:5]) * torch.softmax(p[:, :, 5:], dim=2)  # (B, num, classes, H, W)
    return boxes, probs.permute(0, 1, 3, 4, 2).reshape(b, -1, classes)


def parse_cfg(text: str) -> list[dict]:
    sections = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line[1:-1]})
        else:
            key, value = (part.strip() for part in line.split("=", 1))
            sections[-1][key] = value
    return sections


class DarknetReference:
    """Runs a parsed cfg with the weights of a darknet file; ``forward`` returns the [yolo] / [region] layers'
    inputs."""

    def __init__(self, cfg_text: str, weights_path) -> None:
        self.sections = parse_cfg(cfg_text)
        data = open(weights_path, "rb").read()
        major, minor, _ = struct.unpack_from("<3i", data)
        header = 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16
        self.values = np.frombuffer(data, "<f4", offset=header)
        self.offset = 0
        self.params: list[dict | None] = []
        channels = [int(self.sections[0].get("channels", 3))]
        for section in self.sections[1:]:
            kind = section["type"]
            if kind == "convolutional":
                c_in, filters, size = channels[-1], int(section["filters"]), int(section["size"])
                p = {}
                if int(section.get("batch_normalize", 0)):
                    p["beta"], p["gamma"], p["mean"], p["var"] = (self._take(filters) for _ in range(4))
                else:
                    p["bias"] = self._take(filters)
                p["weight"] = self._take(filters * c_in * size * size).view(filters, c_in, size, size)
                self.params.append(p)
                channels.append(filters)
            elif kind == "route":
                index = len(channels) - 1
                sources = [int(v) for v in section["layers"].split(",")]
                channels.append(sum(channels[1:][s if s >= 0 else index + s] for s in sources))
                self.params.append(None)
            elif kind == "reorg":
                stride = int(section.get("stride", 2))
                channels.append(channels[-1] * stride * stride)
                self.params.append(None)
            else:  # shortcut, upsample, maxpool, yolo keep the channel count
                channels.append(channels[-1])
                self.params.append(None)
        assert self.offset == len(self.values), f"{len(self.values) - self.offset} values left in the file"

    def _take(self, n: int) -> torch.Tensor:
        chunk = torch.from_numpy(self.values[self.offset:self.offset + n].copy())
        self.offset += n
        return chunk

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs, heads = [], []
        for index, (section, p) in enumerate(zip(self.sections[1:], self.params)):
            kind = section["type"]
            if kind == "convolutional":
                size, stride = int(section["size"]), int(section.get("stride", 1))
                pad = size // 2 if int(section.get("pad", 0)) else int(section.get("padding", 0))
                x = F.conv2d(x, p["weight"], p.get("bias"), stride, pad)
                if "gamma" in p:
                    shape = (1, -1, 1, 1)
                    x = (x - p["mean"].view(shape)) / torch.sqrt(p["var"].view(shape) + 1e-5)
                    x = x * p["gamma"].view(shape) + p["beta"].view(shape)
                if section.get("activation") == "leaky":
                    x = torch.where(x > 0, x, 0.1 * x)
                elif section.get("activation") == "mish":
                    x = x * torch.tanh(F.softplus(x))
            elif kind == "shortcut":
                x = x + outputs[index + int(section["from"])]
            elif kind == "route":
                sources = [int(v) for v in section["layers"].split(",")]
                x = torch.cat([outputs[s if s >= 0 else index + s] for s in sources], dim=1)
            elif kind == "upsample":
                x = F.interpolate(x, scale_factor=int(section["stride"]), mode="nearest")
            elif kind == "maxpool":
                size, stride = int(section["size"]), int(section["stride"])
                padding = int(section.get("padding", size - 1))  # darknet: size - 1 in all, -inf filled
                left = padding // 2
                x = F.pad(x, (left, padding - left, left, padding - left), value=float("-inf"))
                x = F.max_pool2d(x, size, stride)
            elif kind == "reorg":  # darknet's old reorg (forward=0 in reorg_cpu), not pixel_unshuffle
                x = darknet_reorg(x, int(section.get("stride", 2)))
            elif kind in ("yolo", "region"):
                heads.append(x)
            else:
                raise ValueError(f"layer type {kind} is not in this reference")
            outputs.append(x)
        return heads


def darknet_reorg(x: torch.Tensor, stride: int) -> torch.Tensor:
    """darknet's reorg_cpu(x, w, h, c, batch, stride, forward=0, out), as YOLOv2's [reorg] layer calls it with its
    input's w, h, c, written from that loop: out[in_index] = x[out_index], where the read index treats the input
    as (c / stride², h·stride, w·stride); the result is read as (c·stride², h / stride, w / stride)."""
    b, c, h, w = x.shape
    out_c = c // (stride * stride)
    k, j, i = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    c2, offset = k % out_c, k // out_c
    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
    out_index = w2 + w * stride * (h2 + h * stride * c2)
    in_index = i + w * (j + h * k)
    flat = x.reshape(b, -1)
    out = torch.empty_like(flat)
    out[:, in_index.flatten()] = flat[:, out_index.flatten()]
    return out.view(b, c * stride * stride, h // stride, w // stride)
