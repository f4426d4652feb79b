"""Which channels of a detector can be removed together: Torch-Pruning's dependency graph, read as groups.

A *channel group* is one set of feature-map channels that must be kept or removed as a unit: the output
channels of every convolution (and its BatchNorm) that writes them, the input channels of every layer that
reads them. Torch-Pruning (Fang et al., CVPR 2023) builds the graph from the autograd graph of one forward
pass, so residual adds, concatenations (with their offsets), SPP's repeated concatenation, nearest upsampling,
depthwise convolutions and FPN laterals couple channels without per-model code.

Not prunable: the detection heads' output convolutions (their channels are the predictions; found as the
convolutions whose outputs no other layer reads), groups with a BatchNorm-free writer (SSD-VGG's layers:
no γ to rank channels by), groups whose channel mapping is not one-to-one across BatchNorms (e.g. through
YOLOv2's space-to-depth reorg, which Torch-Pruning does not model), each reported with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

_IN_CHANNEL_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_OUT_CHANNEL_FNS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels)


@dataclass
class ChannelGroup:
    """One coupled set of channels.

    Attributes:
        root: name of the convolution that identifies the group (its output channels are the group's).
        channels: the group's channel count C.
        batchnorms: (name, idxs) of every BatchNorm normalising the channels; ``idxs[i]`` is the BatchNorm
            channel of group channel i.
        writers: names of the convolutions whose output channels are the group's (depthwise ones included).
        readers: (name, idxs) of the convolutions/linears that read the channels (their input channels).
        reason: why the group cannot be pruned; empty when it can.
    """

    root: str
    channels: int
    batchnorms: list[tuple[str, list[int]]] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    readers: list[tuple[str, list[int]]] = field(default_factory=list)
    reason: str = ""

    @property
    def prunable(self) -> bool:
        return not self.reason


def example_images(size: int | Sequence[int] = 64, batch: int = 1) -> Tensor:
    """(batch, 3, H, W) random images in 0–1 for tracing; ``size`` a side or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def trace_size(model: nn.Module) -> int:
    """The input side to trace ``model`` at: its ``input_size`` when it is built for one (YOLOv1), else 64
    (enough for stride-32 detectors; the channel structure does not depend on the size)."""
    return int(getattr(model, "input_size", 64))


def _dummy_targets(images: Tensor) -> list[dict]:
    h, w = images.shape[-2:]
    box = torch.tensor([[0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h]], device=images.device)
    return [{"boxes": box, "labels": torch.zeros(1, dtype=torch.long, device=images.device)} for _ in images]


def _collect_layer_outputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    # Traced in training mode on a dummy target, from every conv/linear output (caught by forward hooks; the
    # losses' own graph would only slow the trace down): detectors run their heads under no_grad at inference
    # (post-processing, GCNN's steps), so only the training forward reaches every layer with gradients.
    outputs: list[Tensor] = []

    def keep(_module, _inputs, out) -> None:
        if isinstance(out, Tensor) and out.requires_grad:
            outputs.append(out)

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.train()  # (Torch-Pruning switches the model to eval mode before calling this)
    try:
        with torch.enable_grad():
            model(images, _dummy_targets(images))
    finally:
        for h in handles:
            h.remove()
    return outputs


def dependency_graph(model: nn.Module, images: Tensor | None = None) -> tp.DependencyGraph:
    """Torch-Pruning's graph of ``model`` from one training-mode forward pass on ``images`` (default
    :func:`example_images` of :func:`trace_size`) with a dummy target; the model's mode and BatchNorm
    statistics are restored."""
    images = example_images(trace_size(model)) if images is None else images
    training = model.training
    param = next(model.parameters(), None)
    images = images.to(param.device) if param is not None else images
    if images.shape[0] < 2:  # training-mode BatchNorm needs two values per channel on 1×1 maps
        images = images.repeat(2, 1, 1, 1)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point() or "running" in k}
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=images,
                                                      forward_fn=_collect_layer_outputs)
    except Exception as exc:
        raise RuntimeError(f"could not trace {type(model).__name__} for channel pruning on an input of shape "
                           f"{tuple(images.shape)}: {exc}") from exc
    finally:
        model.train(training)
        with torch.no_grad():
            state = model.state_dict()
            for k, v in buffers.items():
                state[k].copy_(v)
    return graph


def _group(graph: tp.DependencyGraph, names: dict[nn.Module, str], conv: nn.Conv2d,
           following: dict[str, str]) -> ChannelGroup:
    channels = conv.out_channels
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(channels)))
    result = ChannelGroup(names[conv], channels)
    for dep, idxs in group:
        module, fn = dep.target.module, dep.handler
        if module not in names:
            continue  # an operation node (add, concat, activation)
        idxs = [int(i) for i in idxs]
        size = _channel_count(module, fn)
        if idxs and size is not None and max(idxs) >= size and not result.reason:
            result.reason = (f"channels map out of range of {names[module]} ({max(idxs)} >= {size}): an operation "
                             f"the dependency graph does not model (e.g. a space-to-depth reorg) is on the way")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            result.batchnorms.append((names[module], idxs))
        elif fn in _OUT_CHANNEL_FNS or fn == tp.prune_depthwise_conv_in_channels:
            if names[module] not in result.writers:
                result.writers.append(names[module])
        elif fn in _IN_CHANNEL_FNS:
            result.readers.append((names[module], idxs))
    result.reason = result.reason or _unprunable_reason(result, following)
    return result


def _channel_count(module: nn.Module, fn) -> int | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels if fn in (tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels) \
            else module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features if fn == tp.prune_linear_in_channels else module.out_features
    return None


def _unprunable_reason(group: ChannelGroup, following: dict[str, str]) -> str:
    if not group.readers:
        return "output convolution (nothing reads its channels: a head's predictions)"
    if not group.batchnorms:
        return "no BatchNorm on these channels (no γ to rank them by)"
    if any(len(idxs) != group.channels for _, idxs in group.batchnorms):
        return "channels map onto a BatchNorm other than one-to-one (e.g. a space-to-depth reorg)"
    normalised = {bn for bn, _ in group.batchnorms}
    for writer in group.writers:
        if following.get(writer) not in normalised:
            return f"{writer} writes these channels without a BatchNorm after it"
    return ""


def batchnorms_after(graph: tp.DependencyGraph, model: nn.Module) -> dict[str, str]:
    """{conv name: name of the BatchNorm that directly normalises its output} from the traced graph."""
    names = {m: n for n, m in model.named_modules()}
    following = {}
    for module, node in graph.module2node.items():
        if isinstance(module, nn.Conv2d) and module in names:
            for out in node.outputs:
                if isinstance(out.module, nn.modules.batchnorm._BatchNorm) and out.module in names:
                    following[names[module]] = names[out.module]
    return following


def channel_groups(model: nn.Module, images: Tensor | None = None,
                   graph: tp.DependencyGraph | None = None) -> list[ChannelGroup]:
    """Every channel group of ``model`` (one per convolution output that is not part of an earlier group),
    in module order; ``group.prunable`` says which may lose channels. ``graph``: an already built
    :func:`dependency_graph` of ``model`` (else traced on ``images``)."""
    graph = dependency_graph(model, images) if graph is None else graph
    names = {m: n for n, m in model.named_modules()}
    following = batchnorms_after(graph, model)
    groups: list[ChannelGroup] = []
    covered: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in covered:
            continue
        if module.groups > 1 and module.groups == module.in_channels:
            continue  # depthwise: its channels belong to the group of the conv feeding it
        group = _group(graph, names, module, following)
        covered.update(group.writers)
        groups.append(group)
    return groups


def prunable_batchnorms(model: nn.Module, images: Tensor | None = None) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorms whose γ rank the channels of a prunable group (what sparsity training penalises)."""
    modules = dict(model.named_modules())
    names = {bn for g in channel_groups(model, images) if g.prunable for bn, _ in g.batchnorms}
    return [modules[n] for n in sorted(names)]
