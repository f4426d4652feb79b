"""An independent reference for darknet's layer semantics, for the converter's tests: cfg writers for YOLOv1,
YOLOv3 and YOLOv4 at any width/depth and a small interpreter that reads a cfg and a ``.weights`` file its own way
and runs the network as darknet does (convolutional with BN ε 1e-5 and leaky 0.1 or mish, shortcut, route of one
or several layers, upsample, maxpool with darknet's padding, reorg, yolo with its ``scale_x_y`` box decoding;
YOLOv1's local, dropout, connected and detection; YOLOv2's region), with a yolov2.cfg writer.
Nothing here imports detkit.

Also cfg writers for yolov3-tiny, yolov4-tiny (route ``groups``/``group_id``) and yolov2-tiny ([region]) at any
width, and :func:`decode_heads`, darknet's box and score decoding of [yolo] (``scale_x_y``) and [region] layers."""

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


def yolov1_cfg(width: int, repeats: tuple[int, int], num_classes: int, size: int, side: int = 7, num: int = 3,
               local_filters: int = 256) -> str:
    """yolov1.cfg's layer sequence for ``size`` px inputs with every conv's filters scaled by ``width`` / 64
    (yolov1.cfg: 64) and ``repeats`` (1×1 256, 3×3 512) and (1×1 512, 3×3 1024) pairs in its 4th and 5th blocks
    (yolov1.cfg: 4, 2); then [local] 3×3 pad 1 of ``local_filters``, [dropout] .5, [connected] to
    side²·(classes + 5·num) and [detection]."""
    layers = [f"[net]\nwidth={size}\nheight={size}\nchannels=3"]

    def conv(filters: int, size: int, stride: int = 1) -> None:
        filters = max(1, round(filters * width / 64))
        layers.append(f"[convolutional]\nbatch_normalize=1\nfilters={filters}\nsize={size}\nstride={stride}\n"
                      "pad=1\nactivation=leaky")

    def maxpool() -> None:
        layers.append("[maxpool]\nsize=2\nstride=2")

    conv(64, 7, 2)
    maxpool()
    conv(192, 3)
    maxpool()
    conv(128, 1), conv(256, 3), conv(256, 1), conv(512, 3)
    maxpool()
    for _ in range(repeats[0]):
        conv(256, 1), conv(512, 3)
    conv(512, 1), conv(1024, 3)
    maxpool()
    for _ in range(repeats[1]):
        conv(512, 1), conv(1024, 3)
    conv(1024, 3), conv(1024, 3, 2), conv(1024, 3), conv(1024, 3)
    layers.append(f"[local]\nsize=3\nstride=1\npad=1\nfilters={local_filters}\nactivation=leaky")
    layers.append("[dropout]\nprobability=.5")
    layers.append(f"[connected]\noutput={side * side * (num_classes + 5 * num)}\nactivation=linear")
    layers.append(f"[detection]\nclasses={num_classes}\ncoords=4\nrescore=1\nside={side}\nnum={num}\nsoftmax=0\n"
                  "sqrt=1")
    return "\n\n".join(layers) + "\n"


def spatial_sizes(sections: list[dict]) -> list[tuple[int, int]]:
    """(h, w) of each layer's output, for the layers of a yolov1.cfg (convolutional, maxpool, local, dropout,
    connected, detection), with darknet's size formulas."""
    h, w = int(sections[0]["height"]), int(sections[0]["width"])
    sizes = []
    for section in sections[1:]:
        kind = section["type"]
        size, stride = int(section.get("size", 1)), int(section.get("stride", 1))
        if kind == "convolutional":
            pad = size // 2 if int(section.get("pad", 0)) else int(section.get("padding", 0))
            h, w = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        elif kind == "maxpool":
            padding = int(section.get("padding", size - 1))
            h, w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
        elif kind == "local":  # local_out_height: with pad, (h - 1) / stride + 1
            shrink = 1 if int(section.get("pad", 0)) else size
            h, w = (h - shrink) // stride + 1, (w - shrink) // stride + 1
        elif kind == "connected":
            h, w = 1, 1
        elif kind not in ("dropout", "detection"):
            raise ValueError(f"spatial_sizes does not know layer type {kind}")
        sizes.append((h, w))
    return sizes


def local_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """darknet's [local] layer, position by position: output (n, filters, out_h, out_w) at (y, x) is the bias
    there plus the sum over the size×size patch at (y·stride − pad, x·stride − pad) (zeros outside the input) of
    that position's kernels, ``weight`` (out_h·out_w, filters, c, size, size) indexed y·out_w + x."""
    filters, out_h, out_w = bias.shape
    size = weight.shape[-1]
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty(len(x), filters, out_h, out_w)
    for y in range(out_h):
        for x_ in range(out_w):
            patch = padded[:, :, y * stride:y * stride + size, x_ * stride:x_ * stride + size]
            out[:, :, y, x_] = patch.flatten(1) @ weight[y * out_w + x_].flatten(1).T + bias[:, y, x_]
    return out


YOLOV4_ANCHORS = [[12, 16], [19, 36], [40, 28], [36, 75], [76, 55], [72, 146], [142, 110], [192, 243], [459, 401]]


def yolov4_cfg(width: int, depths: list[int], num_classes: int, scale_x_y: tuple[float, ...] = (1.2, 1.1, 1.05),
               anchors: list[list[int]] = YOLOV4_ANCHORS) -> str:
    """yolov4.cfg's layer sequence with stem ``width`` and CSP stage ``depths`` (CSPDarknet53: 32, [1, 2, 8, 8, 4]):
    mish in the backbone, leaky after it; three [yolo] layers, shallowest first, with ``scale_x_y`` and
    ``anchors`` (pixels, 9 of them, three per layer)."""
    layers: list[str] = ["[net]\nwidth=608\nheight=608\nchannels=3"]

    def add(text: str) -> int:
        layers.append(text)
        return len(layers) - 2

    def conv(filters: int, size: int, stride: int = 1, act: str = "leaky", bn: bool = True) -> int:
        return add(f"[convolutional]\nbatch_normalize={int(bn)}\nfilters={filters}\nsize={size}\nstride={stride}\n"
                   f"pad=1\nactivation={act}")

    def route(*sources: int) -> int:  # written relative to the route, as the cfg has them
        here = len(layers) - 1
        return add("[route]\nlayers=" + ",".join(str(source - here) for source in sources))

    def conv_set(filters: int, convs: int) -> int:  # 1x1, 3x3, 1x1, ...: ``convs`` of them
        for k in range(convs):
            last = conv(filters if k % 2 == 0 else 2 * filters, 1 if k % 2 == 0 else 3)
        return last

    conv(width, 3, act="mish")
    stage_outputs = []
    for i, depth in enumerate(depths):
        channels = 2 * width * 2**i
        branch = channels if i == 0 else channels // 2  # the first CSP stage keeps both branches wide
        down = conv(channels, 3, 2, act="mish")
        bypass = conv(branch, 1, act="mish")
        route(down)
        conv(branch, 1, act="mish")
        for _ in range(depth):
            conv(branch // 2 if i == 0 else branch, 1, act="mish")
            conv(branch, 3, act="mish")
            add("[shortcut]\nfrom=-3\nactivation=linear")
        main = conv(branch, 1, act="mish")
        route(main, bypass)
        stage_outputs.append(conv(channels, 1, act="mish"))
    levels, outputs = 3, 5 + num_classes
    mids = [2 * width * 2 ** (len(depths) - levels + level) // 2 for level in range(levels)]  # shallowest first
    conv_set(mids[-1], 3)
    for size in (5, 9, 13):
        pool = add(f"[maxpool]\nstride=1\nsize={size}")
        if size != 13:
            route(pool - 1 if size == 5 else pool - 3)
    route(pool, pool - 2, pool - 4, pool - 5)  # -1,-3,-5,-6: the largest pool first, the input last
    top_down = [conv_set(mids[-1], 3)]  # deepest first
    for level in reversed(range(levels - 1)):
        conv(mids[level], 1)
        up = add("[upsample]\nstride=2")
        route(stage_outputs[len(depths) - levels + level])
        lateral = conv(mids[level], 1)
        route(lateral, up)
        top_down.append(conv_set(mids[level], 5))
    previous = top_down[-1]
    for level in range(levels):
        if level:
            route(previous)
            down = conv(mids[level], 3, 2)
            route(down, top_down[levels - 1 - level])
            previous = conv_set(mids[level], 5)
        conv(2 * mids[level], 3)
        conv(3 * outputs, 1, act="linear", bn=False)
        add(f"[yolo]\nmask={','.join(str(3 * level + k) for k in range(3))}\n"
            f"anchors={', '.join(str(v) for pair in anchors for v in pair)}\nclasses={num_classes}\nnum=9\n"
            f"scale_x_y={scale_x_y[level]}")
    return "\n\n".join(layers) + "\n"
class _CfgWriter:
    """Darknet cfg sections in order; ``add`` returns the layer's index (darknet numbers from 0, after [net])."""

    def __init__(self) -> None:
        self.layers: list[str] = ["[net]\nwidth=416\nheight=416\nchannels=3"]

    def add(self, text: str) -> int:
        self.layers.append(text)
        return len(self.layers) - 2

    def conv(self, filters: int, size: int, stride: int = 1, bn: bool = True, act: str = "leaky") -> int:
        return self.add(f"[convolutional]\nbatch_normalize={int(bn)}\nfilters={filters}\nsize={size}\n"
                        f"stride={stride}\npad=1\nactivation={act}")

    def maxpool(self, size: int, stride: int) -> int:
        return self.add(f"[maxpool]\nsize={size}\nstride={stride}")

    def text(self) -> str:
        return "\n\n".join(self.layers) + "\n"


TINY_ANCHORS = "10,14,  23,27,  37,58,  81,82,  135,169,  344,319"  # yolov3-tiny.cfg's and yolov4-tiny.cfg's
REGION_ANCHORS = "0.57273, 0.677385, 1.87446, 2.06253, 3.33843, 5.47434, 7.88282, 3.52778, 9.77052, 9.16828"


def _tiny_backbone(w: _CfgWriter, width: int) -> int:
    """yolov2-tiny's / yolov3-tiny's convs and pools; returns the index of the stride-16 conv (layer 8)."""
    routed = 0
    for i in range(6):
        index = w.conv(width * 2**i, 3)
        if i == 4:
            routed = index
        w.maxpool(2, 2 if i < 5 else 1)
    w.conv(64 * width, 3)
    return routed


def _tiny_heads(w: _CfgWriter, channels: int, fine: int, yolo: str, masks: tuple[str, str]) -> None:
    """yolov3-tiny's / yolov4-tiny's neck and heads after the backbone: a 1×1 conv of ``channels`` (256 in the
    cfgs), 3×3 (2·channels), output conv, [yolo] with ``masks[1]``; route back, 1×1 (channels / 2), upsample,
    route onto layer ``fine``, 3×3 (channels), output conv, [yolo] with ``masks[0]``."""
    outputs = 3 * (5 + int(parse_cfg(yolo)[0]["classes"]))
    w.conv(channels, 1)
    w.conv(2 * channels, 3)
    w.conv(outputs, 1, bn=False, act="linear")
    w.add(f"{yolo}\nmask={masks[1]}")
    w.add("[route]\nlayers=-4")
    w.conv(channels // 2, 1)
    w.add("[upsample]\nstride=2")
    w.add(f"[route]\nlayers=-1,{fine}")
    w.conv(channels, 3)
    w.conv(outputs, 1, bn=False, act="linear")
    w.add(f"{yolo}\nmask={masks[0]}")


def yolov3_tiny_cfg(width: int, num_classes: int) -> str:
    """yolov3-tiny.cfg's layer sequence with first-conv ``width`` (16 in the cfg; every width scales with it)."""
    w = _CfgWriter()
    fine = _tiny_backbone(w, width)
    _tiny_heads(w, 16 * width, fine, f"[yolo]\nanchors={TINY_ANCHORS}\nclasses={num_classes}\nnum=6",
                ("0,1,2", "3,4,5"))
    return w.text()


def yolov4_tiny_cfg(width: int, num_classes: int) -> str:
    """yolov4-tiny.cfg's layer sequence with first-conv ``width`` (32 in the cfg; every width scales with it)."""
    w = _CfgWriter()
    w.conv(width, 3, 2)
    w.conv(2 * width, 3, 2)
    fine = 0
    for c in (2 * width, 4 * width, 8 * width):
        w.conv(c, 3)
        w.add("[route]\nlayers=-1\ngroups=2\ngroup_id=1")
        w.conv(c // 2, 3)
        w.conv(c // 2, 3)
        w.add("[route]\nlayers=-1,-2")
        fine = w.conv(c, 1)
        w.add("[route]\nlayers=-6,-1")
        w.maxpool(2, 2)
    w.conv(16 * width, 3)
    _tiny_heads(w, 8 * width, fine, f"[yolo]\nanchors={TINY_ANCHORS}\nclasses={num_classes}\nnum=6\nscale_x_y=1.05",
                ("1,2,3", "3,4,5"))
    return w.text()


def yolov2_tiny_cfg(width: int, num_classes: int) -> str:
    """yolov2-tiny.cfg's (COCO) layer sequence with first-conv ``width`` (16 in the cfg)."""
    w = _CfgWriter()
    _tiny_backbone(w, width)
    w.conv(32 * width, 3)
    w.conv(5 * (5 + num_classes), 1, bn=False, act="linear")
    w.add(f"[region]\nanchors={REGION_ANCHORS}\nclasses={num_classes}\ncoords=4\nnum=5\nsoftmax=1")
    return w.text()


def decode_heads(cfg_text: str, heads: list[torch.Tensor], net_size: tuple[int, int]) -> list[tuple]:
    """Darknet's decoding of each [yolo] / [region] layer's input (``heads``, in cfg order) for a network input
    of ``net_size`` (h, w): per layer (boxes (B, A, H, W, 4) xyxy in input pixels, scores (B, A, H, W, C)).

    [yolo] (yolo_layer.c): x = (i + s·σ(tx) − (s − 1)/2) / W · net_w with s = ``scale_x_y``, w = e^tw · the
    ``mask``-th anchor (pixels); score σ(obj)·σ(class). [region] (region_layer.c): x = (i + σ(tx)) / W · net_w,
    w = e^tw · anchor / W · net_w (anchors in grid cells); score σ(obj)·softmax(classes)."""
    layers = [s for s in parse_cfg(cfg_text) if s["type"] in ("yolo", "region")]
    decoded = []
    for section, x in zip(layers, heads):
        b, _, h, w = x.shape
        classes = int(section["classes"])
        values = [float(v) for v in section["anchors"].split(",")]
        anchors = torch.tensor(values).view(-1, 2)
        if section["type"] == "yolo":
            anchors = anchors[[int(m) for m in section["mask"].split(",")]]
            scale = float(section.get("scale_x_y", 1))
        else:
            anchors = anchors * torch.tensor([net_size[1] / w, net_size[0] / h])
            scale = 1.0
        x = x.view(b, len(anchors), 5 + classes, h, w).permute(0, 1, 3, 4, 2)
        xs = (torch.arange(w).view(1, 1, 1, w) + scale * x[..., 0].sigmoid() - (scale - 1) / 2) / w * net_size[1]
        ys = (torch.arange(h).view(1, 1, h, 1) + scale * x[..., 1].sigmoid() - (scale - 1) / 2) / h * net_size[0]
        bw = x[..., 2].exp() * anchors[:, 0].view(1, -1, 1, 1)
        bh = x[..., 3].exp() * anchors[:, 1].view(1, -1, 1, 1)
        boxes = torch.stack([xs - bw / 2, ys - bh / 2, xs + bw / 2, ys + bh / 2], dim=-1)
        cls = x[..., 5:].softmax(-1) if section["type"] == "region" and int(section.get("softmax", 0)) else \
            x[..., 5:].sigmoid()
        decoded.append((boxes, x[..., 4:5].sigmoid() * cls))
    return decoded
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
        v1 = any(s["type"] in ("local", "connected") for s in self.sections)
        sizes = spatial_sizes(self.sections) if v1 else None
        in_size = (int(self.sections[0].get("height", 0)), int(self.sections[0].get("width", 0)))
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
            elif kind == "local":  # biases, one per output value, then per output position its kernels
                c_in, filters, size = channels[-1], int(section["filters"]), int(section["size"])
                out_h, out_w = sizes[len(self.params)]
                bias = self._take(filters * out_h * out_w).view(filters, out_h, out_w)
                weight = self._take(out_h * out_w * filters * c_in * size * size)
                self.params.append({"bias": bias, "weight": weight.view(out_h * out_w, filters, c_in, size, size)})
                channels.append(filters)
            elif kind == "connected":  # biases, then weights outputs × inputs (no batch_normalize in yolov1.cfg)
                h, w = sizes[len(self.params) - 1] if self.params else in_size
                inputs, outputs = channels[-1] * h * w, int(section["output"])
                bias = self._take(outputs)
                self.params.append({"bias": bias, "weight": self._take(outputs * inputs).view(outputs, inputs)})
                channels.append(outputs)
            elif kind == "route":
                index = len(channels) - 1
                sources = [int(v) for v in section["layers"].split(",")]
                total = sum(channels[1:][s if s >= 0 else index + s] for s in sources)
                channels.append(total // int(section.get("groups", 1)))
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
                # groups/group_id (yolov4-tiny): that part of each source's channels, as route_layer.c copies
                groups, group_id = int(section.get("groups", 1)), int(section.get("group_id", 0))
                x = torch.cat([outputs[s if s >= 0 else index + s].chunk(groups, dim=1)[group_id] for s in sources],
                              dim=1)
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
            elif kind == "local":
                pad = int(section.get("pad", 0))
                x = local_forward(x, p["weight"], p["bias"], int(section.get("stride", 1)), pad)
                if section.get("activation") == "leaky":
                    x = torch.where(x > 0, x, 0.1 * x)
            elif kind == "connected":
                x = x.flatten(1) @ p["weight"].T + p["bias"]
                if section.get("activation") == "leaky":
                    x = torch.where(x > 0, x, 0.1 * x)
            elif kind == "dropout":  # identity at inference
                pass
            elif kind in ("yolo", "region", "detection"):
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
