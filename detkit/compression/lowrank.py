"""Low-rank decomposition of convolutions and linear layers, replaced in place in any detkit model.

- Linear layers and 1×1 convolutions: truncated SVD, W (O, I) ≈ U_r S_r V_rᵀ → two layers, I → r → O.
- k×k convolutions: Tucker-2 (Kim et al., ICLR 2016) by HOSVD of the kernel's two channel modes:
  W (O, I, k, k) ≈ core (r_out, r_in, k, k) ×₀ U_out (O, r_out) ×₁ U_in (I, r_in) → three convs,
  1×1 (I → r_in), k×k core (r_in → r_out, the original stride/padding/dilation), 1×1 (r_out → O, bias).

Ranks follow an energy rule: the smallest r whose leading singular values hold ≥ ``energy`` of the sum of
squared singular values (energy 1 keeps every singular value: the layer is reproduced up to rounding).
Grouped/depthwise convolutions are left alone. Fine-tune afterwards with the normal trainer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ energy · Σ s_i² (``singular_values`` descending, (N,)); N when
    energy ≥ 1."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if energy >= 1.0:
        return len(singular_values)
    power = singular_values.double().square()
    cumulative = power.cumsum(0) / power.sum().clamp(min=1e-300)
    return min(int((cumulative < energy).sum()) + 1, len(singular_values))


def _check_rank(rank: int, available: int) -> int:
    if not 1 <= rank <= available:
        raise ValueError(f"rank {rank} is outside 1..{available} for this layer")
    return int(rank)


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.no_grad()
def svd_layers(layer: nn.Linear | nn.Conv2d, energy: float = 1.0,
               ranks: list[int] | None = None) -> tuple[nn.Sequential, list[int]]:
    """A linear layer or 1×1 conv as two: in → r (no bias, carries the stride and padding) → out (bias);
    r by :func:`energy_rank`, or ``ranks[0]``."""
    is_conv = isinstance(layer, nn.Conv2d)
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()  # (O, I)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    r = energy_rank(s, energy) if ranks is None else _check_rank(ranks[0], len(s))
    first_w, second_w = (s[:r, None] * vh[:r]), u[:, :r]  # (r, I), (O, r)
    out_features, in_features = weight.shape
    bias = layer.bias is not None
    if is_conv:
        first = nn.Conv2d(in_features, r, 1, layer.stride, layer.padding, bias=False)
        second = nn.Conv2d(r, out_features, 1, bias=bias)
        first_w, second_w = first_w[..., None, None], second_w[..., None, None]
    else:
        first, second = nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=bias)
    first.weight.copy_(first_w)
    second.weight.copy_(second_w)
    if bias:
        second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device, layer.weight.dtype), [r]


@torch.no_grad()
def tucker2_layers(conv: nn.Conv2d, energy: float = 1.0,
                   ranks: list[int] | None = None) -> tuple[nn.Sequential, list[int]]:
    """A k×k conv as 1×1 (I → r_in) → k×k core (r_in → r_out) → 1×1 (r_out → O), ranks by :func:`energy_rank`
    on each channel mode's unfolding, or ``ranks`` = [r_in, r_out]."""
    w = conv.weight.detach().double()  # (O, I, kh, kw)
    out_c, in_c = w.shape[:2]
    u_out, s_out, _ = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
    u_in, s_in, _ = torch.linalg.svd(w.transpose(0, 1).reshape(in_c, -1), full_matrices=False)
    if ranks is None:
        r_in, r_out = energy_rank(s_in, energy), energy_rank(s_out, energy)
    else:
        r_in, r_out = _check_rank(ranks[0], len(s_in)), _check_rank(ranks[1], len(s_out))
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)  # (r_out, r_in, kh, kw)
    first = nn.Conv2d(in_c, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(r_out, out_c, 1, bias=conv.bias is not None)
    first.weight.copy_(u_in.T[..., None, None])
    middle.weight.copy_(core)
    last.weight.copy_(u_out[..., None, None])
    if conv.bias is not None:
        last.bias.copy_(conv.bias)
    return nn.Sequential(first, middle, last).to(conv.weight.device, conv.weight.dtype), [r_in, r_out]


@dataclass
class LowRankReport:
    """One row per replaced layer: (name, method, weight shape, ranks, params before, params after)."""

    rows: list[tuple[str, str, tuple[int, ...], list[int], int, int]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def format(self) -> str:
        width = max([len(r[0]) for r in self.rows] + [5])
        lines = [f"{'layer':<{width}}  {'method':<7} {'shape':<16} {'ranks':<10} {'params':>9} {'after':>9}"]
        for name, method, shape, ranks, before, after in self.rows:
            shape_text, rank_text = "x".join(map(str, shape)), "/".join(map(str, ranks))
            lines.append(f"{name:<{width}}  {method:<7} {shape_text:<16} {rank_text:<10} {before:>9} {after:>9}")
        lines.append(f"model parameters: {self.params_before} → {self.params_after} "
                     f"({self.params_after / max(self.params_before, 1):.1%})")
        return "\n".join(lines)


def decompose_model(model: nn.Module, energy: float = 0.9, exclude: Iterable[str] = (),
                    skip_if_larger: bool = True) -> LowRankReport:
    """Replace, in place, every linear layer and ungrouped conv of ``model`` by its low-rank factorisation
    (:func:`svd_layers` for linear and 1×1, :func:`tucker2_layers` for k×k); return a report.

    Args:
        energy: rank rule of :func:`energy_rank`.
        exclude: module-name prefixes to leave alone (e.g. a detector's output convs, whose channels are
            read by the post-processing).
        skip_if_larger: keep a layer whose factorisation would have more parameters than it has.
    """
    energy_rank(torch.ones(1), energy)  # validates energy before touching the model
    exclude = tuple(exclude)
    report = LowRankReport(params_before=_params(model))
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and name and not (exclude and name.startswith(exclude))]
    for name, layer in candidates:
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
            continue
        one_by_one = isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)
        replacement, ranks = svd_layers(layer, energy) if one_by_one else tucker2_layers(layer, energy)
        before, after = _params(layer), _params(replacement)
        if skip_if_larger and after >= before:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
        report.rows.append((name, "svd" if one_by_one else "tucker2", tuple(layer.weight.shape), ranks, before,
                            after))
    report.params_after = _params(model)
    return report


def lowrank_spec(report: LowRankReport) -> dict[str, list[int]]:
    """``{layer name: ranks}`` of the replaced layers: with :func:`apply_lowrank_spec`, what rebuilds the
    factorised architecture before loading a fine-tuned checkpoint (store it beside the weights)."""
    return {name: list(ranks) for name, _, _, ranks, _, _ in report.rows}


def apply_lowrank_spec(model: nn.Module, spec: dict[str, list[int]]) -> None:
    """Factorise, in place, the layers named in ``spec`` at its ranks (then load the checkpoint's weights)."""
    for name, ranks in spec.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"low-rank spec names {name!r}, which the model does not have") from None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"low-rank spec names {name!r}, a {type(layer).__name__}, not a conv/linear layer")
        one_by_one = isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)
        replacement, _ = (svd_layers if one_by_one else tucker2_layers)(layer, ranks=ranks)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
