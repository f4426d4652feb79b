"""Darknet's ``.weights`` format: read into and write from detkit models.

The file is a header and then float32 values with nothing to say where a layer ends:

- int32 major, minor, revision, then ``seen`` (images trained on) as int64 when major·10 + minor ≥ 2 (and both
  below 1000), as int32 before (the YOLOv1/YOLOv2-era files);
- per convolution, in the cfg's order: with ``batch_normalize=1`` BN β, γ, running mean, running variance (each
  ``filters`` values), else the conv bias; then the kernel (filters × channels × size × size, C order);
- per ``[local]`` layer (YOLOv1): a bias per output value (filters × out_h × out_w), then per output position in
  row-major order its kernels (filters × channels × size × size);
- per ``[connected]`` layer: the biases, then the weights (outputs × inputs, the inputs in (c, h, w) order).

So a file only fits a model whose convolutions come in darknet's order with darknet's shapes. :func:`layout`
gives that order for the detkit models that follow a darknet cfg; every float of the file must be consumed,
and a file for another model, a truncated one or one with floats left over is a :class:`ConvertError` that
names the counts. Darknet normalises with ε = 1e-5 (``sqrt(var + .00001)``): a loaded model gets that ε in
every BatchNorm (``model.bn_eps`` in its config).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detkit.engine.checkpoint import atomic_write
from detkit.errors import UserError
from detkit.models.layers import LocallyConnected2d, set_bn_eps

DARKNET_BN_EPS = 1e-5
DARKNET_PAD_VALUE = 127.5  # darknet letterboxes RGB in [0, 1] onto grey 0.5 (detkit's pad is 114 of 255)


class ConvertError(UserError, ValueError):
    """A weights file that does not fit the model it is converted into."""


@dataclass(frozen=True)
class Header:
    major: int = 0
    minor: int = 2
    revision: int = 5
    seen: int = 0

    @property
    def long_seen(self) -> bool:
        """Whether ``seen`` is stored as int64 (darknet's rule) rather than int32."""
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def size(self) -> int:
        return 12 + (8 if self.long_seen else 4)


@dataclass(frozen=True)
class Unit:
    """One darknet convolution: ``conv`` and its ``bn`` (None: the conv has a bias instead); ``name`` is the
    conv's module path, for messages."""

    name: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    kind = "convolution"  # not a field: what messages call it

    @property
    def size(self) -> int:
        """Float count of this unit in a weights file."""
        extra = 4 * self.conv.out_channels if self.bn is not None else self.conv.out_channels
        return extra + self.conv.weight.numel()

    def tensors(self) -> list[torch.Tensor]:
        """This unit's tensors in file order."""
        if self.bn is None:
            return [self.conv.bias, self.conv.weight]
        return [self.bn.bias, self.bn.weight, self.bn.running_mean, self.bn.running_var, self.conv.weight]


@dataclass(frozen=True, eq=False)
class LayerUnit:
    """A darknet layer other than a convolution (``kind``: ``local layer``, ``connected layer``): its tensors
    ``parts`` in file order, each filled from the file in C order; ``name`` is the module path, for messages."""

    name: str
    kind: str
    parts: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return sum(t.numel() for t in self.parts)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts)


# --- the darknet order of detkit's models ---

def _conv_bn_units(module: nn.Module, names: dict[nn.Module, str]) -> Iterator[Unit]:
    """The Conv2d → BatchNorm2d pairs inside ``module`` in registration order (detkit's ConvBNAct)."""
    from detkit.models.layers import ConvBNAct

    for sub in module.modules():
        if isinstance(sub, ConvBNAct):
            yield Unit(names[sub[0]], sub[0], sub[1])


def _head_units(model: nn.Module, level: int, names: dict[nn.Module, str]) -> list[Unit]:
    """A YOLO head's convolutions in darknet's order: its 3×3 conv with BN, then the linear output conv (the
    [yolo] or [region] layer's input)."""
    hidden, output = model.heads[level]
    return [*_conv_bn_units(hidden, names), Unit(names[output], output, None)]


def _yolov3_units(model: nn.Module, names: dict[nn.Module, str]) -> list[Unit]:
    """yolov3.cfg: Darknet-53, then per level from the deepest: the five-conv set, the 3×3 conv and the linear
    output conv (the [yolo] layer's input), then the 1×1 conv that is upsampled onto the next level.
    yolov3-spp.cfg: the SPP block's convs (1×1, 3×3, 1×1, then the pools) come first on the deepest level, whose
    conv set after the pools has three convs (``spp_pairs: 1``, ``neck_pairs: [2, 2, 1]``)."""
    from detkit.models.backbones.darknet import Darknet
    from detkit.models.layers import SqueezeExcitation
    from detkit.models.necks.yolo_fpn import YOLOv3Neck

    backbone, neck = model.backbone, model.neck
    plain = (isinstance(backbone, Darknet) and isinstance(neck, YOLOv3Neck) and model.sam is None
             and backbone.stem[0].stride == (1, 1)
             and not any(isinstance(m, SqueezeExcitation) for m in backbone.modules()))
    if not plain:
        raise ConvertError("this YOLOv3 variant (SAM, SE, a strided stem or another neck) has no darknet cfg "
                           "layout: model=yolov3 and model=yolov3_spp load darknet weights")
    units = list(_conv_bn_units(backbone, names))
    levels = len(neck.sets)
    for i, conv_set in enumerate(neck.sets):  # deepest level first
        if i == 0 and model.spp is not None:
            units += list(_conv_bn_units(model.spp, names))
        units += list(_conv_bn_units(conv_set, names))
        units += _head_units(model, levels - 1 - i, names)
        if i < levels - 1:
            units += list(_conv_bn_units(neck.reduce[i], names))
    return units


def _yolov1_units(model: nn.Module, names: dict[nn.Module, str]) -> list[Unit | LayerUnit]:
    """yolov1.cfg: the 24 convolutions, the [local] layer (bias, weight as :class:`LocallyConnected2d` holds
    them, darknet's order) and the [connected] layer (bias, weight (outputs, inputs)); dropout and the
    [detection] layer have no weights."""
    if not model.darknet_head:
        head = "conv" if model.conv_head else "fully connected"
        raise ConvertError(f"this YOLOv1's {head} head has no darknet cfg: model=yolov1_darknet (yolov1.cfg's "
                           "locally connected head) loads darknet weights")
    local, connected = model.head[0], model.head[-1]
    return [*_conv_bn_units(model.backbone, names),
            LayerUnit(names[local], "local layer", (local.bias, local.weight)),
            LayerUnit(names[connected], "connected layer", (connected.bias, connected.weight))]


def _yolov4_units(model: nn.Module, names: dict[nn.Module, str]) -> list[Unit]:
    """yolov4.cfg: CSPDarknet53 (per stage: the strided conv, the bypass 1×1, the main branch's 1×1, its
    residual units and closing 1×1, the fusing 1×1; the first stage wide), the SPP block's convs (1×1, 3×3,
    1×1, the pools), the deepest top-down set (three convs); per shallower level the 1×1 conv that is upsampled,
    the lateral 1×1 on the backbone map and the five-conv set; the shallowest head (3×3, linear 1×1); then per
    deeper level the stride-2 3×3, the five-conv set and that level's head."""
    from detkit.models.backbones.cspdarknet import CSPDarknet

    backbone, neck, spp = model.backbone, model.neck, model.spp
    top_down = neck.top_down
    darknet = (isinstance(backbone, CSPDarknet) and backbone.stem[0].stride == (1, 1)
               and backbone.stages[0].bypass[0].out_channels == backbone.stages[0].down[0].out_channels
               and spp is not None and len(spp.convs) == 2 and top_down.laterals is not None
               and [len(s) for s in top_down.sets] == [3, 5, 5] and [len(s) for s in neck.sets] == [5, 5]
               and model.sam is None)
    if not darknet:
        raise ConvertError("this YOLOv4 variant is not yolov4.cfg's layout (a wide first CSP stage, SPP with "
                           "spp_pairs 1, lateral convs, top_down_pairs [2, 2, 1], pairs 2, three levels, no "
                           "SAM): model=yolov4 loads darknet's yolov4.weights")

    units = [*_conv_bn_units(backbone, names), *_conv_bn_units(spp, names), *_conv_bn_units(top_down.sets[0], names)]
    for reduce, lateral, conv_set in zip(top_down.reduce, top_down.laterals, top_down.sets[1:]):
        units += [*_conv_bn_units(reduce, names), *_conv_bn_units(lateral, names), *_conv_bn_units(conv_set, names)]
    units += _head_units(model, 0, names)
    for level, (down, conv_set) in enumerate(zip(neck.down, neck.sets), start=1):
        units += [*_conv_bn_units(down, names), *_conv_bn_units(conv_set, names), *_head_units(model, level, names)]
    return units


def _is_tiny(model: nn.Module) -> bool:
    from detkit.models.backbones.darknet_tiny import CSPDarknetTiny, DarknetTiny

    return isinstance(model.backbone, (DarknetTiny, CSPDarknetTiny))


def _tiny_units(model: nn.Module, names: dict[nn.Module, str]) -> list[Unit]:
    """yolov3-tiny.cfg and yolov4-tiny.cfg: the backbone's convs (yolov4-tiny's CSP blocks a, b, c, fuse), then
    the deep level's 1×1 conv, its head (3×3, linear output conv), the 1×1 reduction that is upsampled, the
    stride-16 head. yolov2-tiny.cfg: the backbone's convs, then its one head."""
    from detkit.models.necks.tiny import DeepestMap, TinyNeck

    neck = model.neck
    if not isinstance(neck, (TinyNeck, DeepestMap)) or model.spp is not None or model.sam is not None:
        raise ConvertError("this tiny variant (SPP, SAM or another neck) has no darknet cfg layout: "
                           "model=yolov2_tiny, yolov3_tiny and yolov4_tiny load darknet weights")

    units = list(_conv_bn_units(model.backbone, names))
    if isinstance(neck, DeepestMap):
        return units + _head_units(model, 0, names)
    return [*units, *_conv_bn_units(neck.deep, names), *_head_units(model, -1, names),
            *_conv_bn_units(neck.reduce, names), *_head_units(model, 0, names)]


def _yolov2_units(model: nn.Module, names: dict[nn.Module, str]) -> list[Unit]:
    """yolov2.cfg: Darknet-19's convs, the two 3×3 convs on the deep map, the 1×1 before the [reorg] (routed from
    the stride-16 map), the 3×3 conv after the route, the linear output conv (the [region] layer's input)."""
    from detkit.models.backbones.darknet19 import Darknet19

    neck = model.neck
    plain = (isinstance(model.backbone, Darknet19) and neck.reorg == "darknet" and neck.fuse is None
             and model.spp is None and model.sam is None)
    if not plain:
        raise ConvertError("this YOLOv2 variant (a pixel_unshuffle reorg, a fuse conv, SPP or SAM) has no darknet "
                           "cfg layout: model=yolov2 loads darknet's yolov2.weights")
    units = list(_conv_bn_units(model.backbone, names))
    units += list(_conv_bn_units(neck.deep, names)) + list(_conv_bn_units(neck.reduce, names))
    return [*units, *_head_units(model, 0, names)]


def layout(model: nn.Module) -> list[Unit | LayerUnit]:
    """``model``'s weighted layers in the order of its darknet cfg; a :class:`ConvertError` for a model without
    one."""
    names = {module: name for name, module in model.named_modules()}
    kind = type(model).__name__
    if kind == "YOLOv3" and _is_tiny(model):
        units = _tiny_units(model, names)
    elif kind == "YOLOv3" and type(model.neck).__name__ == "Passthrough":
        units = _yolov2_units(model, names)
    elif kind == "YOLOv3" and type(model.neck).__name__ == "PANet":
        units = _yolov4_units(model, names)
    elif kind == "YOLOv3":
        units = _yolov3_units(model, names)
    elif kind == "YOLOv1":
        units = _yolov1_units(model, names)
    else:
        raise ConvertError(f"{kind} has no darknet layout; darknet weights load into model=yolov3, yolov3_spp, "
                           "yolov4, yolov2, yolov2_tiny, yolov3_tiny, yolov4_tiny and yolov1_darknet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    covered = sum(isinstance(u, Unit) for u in units)
    if covered != len(convs):  # every convolution once, or the order above has missed a piece
        raise ConvertError(f"{type(model).__name__}: the darknet layout covers {covered} of its "
                           f"{len(convs)} convolutions")
    return units


def darknet_parameter_count(model: nn.Module) -> int:
    """Parameters as darknet counts them: conv, connected and local weights and biases, BN γ and β (not the
    running statistics)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, LocallyConnected2d, nn.modules.batchnorm._BatchNorm)):
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


# --- the file ---

def read_weights(path: str | Path) -> tuple[Header, np.ndarray]:
    """(header, the float32 values after it) of a darknet ``.weights`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"darknet weights {path} do not exist")
    data = path.read_bytes()
    if len(data) < 12:
        raise ConvertError(f"{path}: {len(data)} bytes, shorter than a darknet header (12 bytes and `seen`)")
    major, minor, revision = struct.unpack_from("<3i", data)
    probe = Header(major, minor, revision)
    if len(data) < probe.size:
        raise ConvertError(f"{path}: {len(data)} bytes, shorter than its darknet {major}.{minor} header "
                           f"({probe.size} bytes)")
    seen = struct.unpack_from("<q" if probe.long_seen else "<i", data, 12)[0]
    body = len(data) - probe.size
    if body % 4:
        raise ConvertError(f"{path}: {body} bytes after the {probe.size}-byte header are not whole float32 values "
                           "(not a darknet .weights file?)")
    return Header(major, minor, revision, seen), np.frombuffer(data, "<f4", offset=probe.size)


def load_weights(model: nn.Module, path: str | Path) -> Header:
    """Copy the darknet weights file ``path`` into ``model`` (in its :func:`layout` order) and set every
    BatchNorm's ε to darknet's; returns the file's header. Nothing is copied unless the file's float count is
    exactly the model's."""
    units = layout(model)
    header, values = read_weights(path)
    need = sum(u.size for u in units)
    name = type(model).__name__
    if len(values) < need:
        used, index = 0, 0
        while used + units[index].size <= len(values):
            used, index = used + units[index].size, index + 1
        raise ConvertError(
            f"{path}: {len(values):,} floats after its {header.size}-byte header, but this {name} needs {need:,} "
            f"({len(units)} layers in darknet's order): the file ends inside {units[index].kind} {index + 1} "
            f"({units[index].name}). A truncated file, or weights of another model (cfg, class count)?")
    if len(values) > need:
        raise ConvertError(
            f"{path}: {len(values):,} floats after its {header.size}-byte header, but this {name} needs {need:,} "
            f"({len(units)} layers in darknet's order): {len(values) - need:,} are left over. Weights of a "
            "larger model (another cfg or class count)?")
    offset = 0
    with torch.no_grad():
        for unit in units:
            for tensor in unit.tensors():
                n = tensor.numel()
                tensor.copy_(torch.from_numpy(values[offset:offset + n].copy()).view_as(tensor))
                offset += n
    set_bn_eps(model, DARKNET_BN_EPS)
    return header


def save_weights(model: nn.Module, path: str | Path, header: Header = Header()) -> Path:
    """Write ``model`` as a darknet ``.weights`` file (its :func:`layout` order), atomically."""
    units = layout(model)
    head = struct.pack("<3i", header.major, header.minor, header.revision)
    head += struct.pack("<q" if header.long_seen else "<i", header.seen)
    body = [t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()
            for unit in units for t in unit.tensors()]
    return atomic_write(path, lambda f: f.writelines([head, *body]))
