"""Parameters and FLOPs of a model, per module, with PyTorch's own counter (``torch.utils.flop_counter``).

FLOPs count a multiply-add as 2 (FlopCounterMode's convention: a k×k convolution from C_in to C_out channels
on an H×W output costs 2·C_in·C_out·k²·H·W, biases not counted); only the ops it knows (convolutions,
matmuls, attention) count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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
    counter = FlopCounterMode(display=False)
    # Attribute FLOPs to top-level children through their leaf modules (a model may call a leaf directly, or
    # through a slice of a Sequential, which the counter's own module names would miss).
    owner = {id(m): name.split(".")[0] for name, m in model.named_modules() if name and not any(m.children())}
    flops = dict.fromkeys((name for name, _ in model.named_children()), 0)
    starts: list[int] = []
    handles = []
    for m in model.modules():
        if id(m) in owner:
            handles.append(m.register_forward_pre_hook(lambda mod, args: starts.append(counter.get_total_flops())))
            handles.append(m.register_forward_hook(
                lambda mod, args, out: flops.__setitem__(owner[id(mod)], flops[owner[id(mod)]]
                                                         + counter.get_total_flops() - starts.pop())))
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
