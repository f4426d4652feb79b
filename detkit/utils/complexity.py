"""Parameters and FLOPs of a model, per module, with PyTorch's own counter (``torch.utils.flop_counter``).

FLOPs count a multiply-add as 2 (FlopCounterMode's convention: a k×k convolution from C_in to C_out channels
on an H×W output costs 2·C_in·C_out·k²·H·W, biases not counted); only the ops it knows (convolutions,
matmuls, attention) count, and torchvision's deformable convolution, counted as the regular convolution of its
weights (the bilinear sampling of the shifted points is not counted; its offset conv counts as a conv).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.deform_conv2d)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def _deform_conv_flops(input_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None,
                       **kwargs) -> int:
    return conv_flop_count(input_shape, weight_shape, out_shape)


_CUSTOM_FLOPS = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}


@dataclass(frozen=True)
class Complexity:
    """``params`` and ``flops`` (one forward of ``input_shape``) of the whole model and of its top modules."""

    params: int
    flops: int
    input_shape: tuple[int, ...]
    per_module: dict[str, tuple[int, int]]  # top-level child name -> (params, flops)

    def format(self) -> str:
        lines = [f"{self.params / 1e6:.2f}M parameters, {self.flops / 1e9:.2f} GFLOPs at "
                 f"{'x'.join(map(str, self.input_shape))}"]
        lines += [f"  {name:<12} {p / 1e6:7.3f}M params {f / 1e9:8.3f} GFLOPs"
                  for name, (p, f) in self.per_module.items()]
        return "\n".join(lines)


@torch.no_grad()
def complexity(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 320, 320)) -> Complexity:
    """Count ``model``'s parameters and the FLOPs of one eval-mode forward of a zero tensor of ``input_shape``
    (post-processing included, which holds no counted ops). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    # Attribute FLOPs to top-level children through the modules that compute: leaves, and modules with
    # parameters of their own (a deformable conv around its offset conv). A model may call such a module
    # directly, or through a slice of a Sequential, which the counter's own module names would miss. A call's
    # FLOPs exclude those of the counted calls inside it.
    owner = {id(m): name.split(".")[0] for name, m in model.named_modules()
             if name and (not any(m.children()) or any(True for _ in m.parameters(recurse=False)))}
    flops = dict.fromkeys((name for name, _ in model.named_children()), 0)
    calls: list[list[int]] = []  # per open call: [total FLOPs at its start, FLOPs of the counted calls inside]

    def enter(module: nn.Module, args) -> None:
        calls.append([counter.get_total_flops(), 0])

    def leave(module: nn.Module, args, out) -> None:
        start, inner = calls.pop()
        spent = counter.get_total_flops() - start
        flops[owner[id(module)]] += spent - inner
        if calls:
            calls[-1][1] += spent

    handles = []
    for m in model.modules():
        if id(m) in owner:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
    try:
        with counter:
            model(torch.zeros(input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    per_module = {name: (sum(p.numel() for p in child.parameters()), flops[name])
                  for name, child in model.named_children()}
    return Complexity(sum(p.numel() for p in model.parameters()), counter.get_total_flops(), tuple(input_shape),
                      per_module)


def compare(models: Mapping[str, nn.Module], input_shape: tuple[int, ...] = (1, 3, 320, 320)) -> str:
    """A table of each model's parameters and FLOPs at ``input_shape`` (:func:`complexity`), with the ratio
    of each to the first model's: e.g. a backbone with and without an option."""
    rows = {name: complexity(model, input_shape) for name, model in models.items()}
    base = next(iter(rows.values()))
    w = max(len(name) for name in rows)
    lines = [f"{'':<{w}} {'params':>12} {'ratio':>6} {'GFLOPs':>9} {'ratio':>6}  at {'x'.join(map(str, input_shape))}"]
    lines += [f"{name:<{w}} {c.params:>12,} {c.params / base.params:>6.3f} {c.flops / 1e9:>9.3f} "
              f"{c.flops / max(base.flops, 1):>6.3f}" for name, c in rows.items()]
    return "\n".join(lines)
