"""Channel specs: the per-layer widths of a pruned model, stored in its config so that it can be rebuilt.

A channel spec is plain JSON-able data, ``[[conv_name, channels], ...]``: for each pruned channel group, the
name of its root convolution (see :mod:`detkit.compression.graph`) and how many output channels it keeps.
:func:`detkit.app.build.build_model` builds the full-width model from the model config and calls
:func:`apply_channel_spec`, which slims it to those widths (keeping the first channels: the values are
overwritten by ``load_state_dict`` with the pruned checkpoint's weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch_pruning as tp
from torch import Tensor, nn

from detkit.compression.graph import dependency_graph


def _entries(spec) -> list[tuple[str, int]]:
    if isinstance(spec, Mapping):
        raise ValueError("channel_spec must be a list of [module_name, channels] pairs, got a mapping")
    entries = []
    for item in spec:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"channel_spec entries must be [module_name, channels] pairs, got {item!r}")
        name, channels = item
        if not isinstance(name, str) or isinstance(channels, bool) or not isinstance(channels, int):
            raise ValueError(f"channel_spec entry {list(item)!r}: expected [str, int]")
        entries.append((name, channels))
    return entries


def apply_channel_spec(model: nn.Module, channel_spec: Sequence, images: Tensor | None = None) -> nn.Module:
    """Slim ``model`` (freshly built at full width) in place to the widths of ``channel_spec``; returns it.

    Each entry ``[conv_name, k]`` keeps the first k output channels of that convolution and of everything
    coupled to them (BatchNorms, residual partners, readers' input channels). ``images``: the trace input
    (default: :func:`detkit.compression.graph.example_images`). A name that is not a convolution of the
    model, or a count outside 1..its channels, raises ValueError naming the entry.
    """
    entries = _entries(channel_spec)
    if not entries:
        return model
    modules = dict(model.named_modules())
    for name, channels in entries:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"channel_spec names {name!r}, which is not a convolution of "
                             f"{type(model).__name__} (a channel spec from a different model config?)")
        if not 1 <= channels <= conv.out_channels:
            raise ValueError(f"channel_spec asks {name} for {channels} channels; it has {conv.out_channels}")
    graph = dependency_graph(model, images)
    for name, channels in entries:
        conv = modules[name]
        if channels < conv.out_channels:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels,
                                    list(range(channels, conv.out_channels))).prune()
    return model
