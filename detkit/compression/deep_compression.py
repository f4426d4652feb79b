"""Deep Compression (Han et al., ICLR 2016): pruning → k-means weight sharing → Huffman coding.

Pipeline on a detkit model (pruning is :mod:`detkit.compression.magnitude`)::

    prune_by_magnitude(model, 0.8)                     # zeros stay zero: fine-tune with MagnitudePruningHook
    shared = share_weights(model)                      # 2^bits centroids per layer, weights tied to them
    hook = CentroidFineTuningHook(shared)              # optional fine-tuning of the centroids
    report = save_compressed(model, shared, "m.dkc")   # CSR gaps + cluster indices, Huffman coded
    state = load_compressed("m.dkc")                   # dense state dict, weights == centroids[labels]

Sparse storage: the non-zero weights of a layer (its flattened weight, row-major) are stored as (gap, value)
entries, the gap being the distance from the previous entry's position (the first from position -1). A gap
is stored in ``index_bits`` bits as gap - 1, so gaps up to 2^index_bits fit; a larger gap gets the paper's
padding: filler entries at 2^index_bits steps that hold a zero. Fillers carry their own value symbol
(``len(centroids)``), since any centroid index would decode to a non-zero weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from detkit.compression.huffman import huffman_decode, huffman_encode
from detkit.compression.magnitude import prunable_layers
from detkit.engine.checkpoint import load_torch_file
from detkit.engine.hooks import Hook
from detkit.engine.trainer import Trainer
from detkit.errors import CheckpointError

FORMAT = "detkit-deep-compression-1"
PAPER_BITS = {nn.Conv2d: 8, nn.Linear: 5}  # the paper's choice for conv / FC layers (weights and gaps)


@dataclass
class SharedWeight:
    """One layer's weight sharing: ``centroids`` (K,) float32 and ``labels`` (weight's shape) int64, the
    cluster of each weight or -1 where the weight is pruned (zero)."""

    centroids: Tensor
    labels: Tensor

    def dense(self) -> Tensor:
        """The tied weight: centroids[labels], 0 where labels == -1."""
        return torch.where(self.labels >= 0, self.centroids[self.labels.clamp(min=0)], 0.0)


def kmeans_1d(values: Tensor, clusters: int, iterations: int = 30) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on scalars with the paper's linear initialisation (``clusters`` centroids evenly spaced
    between min and max). ``values`` (N,) → (centroids (K,), labels (N,) int64). A centroid left without
    members keeps its position."""
    values = values.detach().float().flatten()
    centroids = torch.linspace(float(values.min()), float(values.max()), clusters)
    labels = torch.zeros_like(values, dtype=torch.long)
    for _ in range(iterations):
        labels = (values[:, None] - centroids[None]).abs().argmin(dim=1)
        sums = torch.zeros(clusters).index_add_(0, labels, values)
        counts = torch.bincount(labels, minlength=clusters).float()
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(moved, centroids):
            break
        centroids = moved
    return centroids, labels


def _bits_for(module: nn.Module, bits: int | Mapping[type, int] | None) -> int:
    if isinstance(bits, int):
        return bits
    table = PAPER_BITS if bits is None else bits
    return next((b for kind, b in table.items() if isinstance(module, kind)), 8)


@torch.no_grad()
def share_weights(model: nn.Module, bits: int | Mapping[type, int] | None = None, exclude: Iterable[str] = (),
                  iterations: int = 30) -> dict[str, SharedWeight]:
    """Cluster each conv/linear layer's non-zero weights into 2^bits shared values and set the weights to
    them in place (zeros stay zero).

    Args:
        bits: bits per cluster index: an int for every layer, ``{module type: bits}``, or None for the paper's
            8 (conv) / 5 (linear).
        exclude: module-name prefixes left as they are (see :func:`prunable_layers`).
    """
    shared = {}
    for name, module in prunable_layers(model, exclude=exclude).items():
        b = _bits_for(module, bits)
        if not 1 <= b <= 16:
            raise ValueError(f"bits per cluster index must be in 1..16, got {b} for layer {name!r}")
        weight = module.weight
        nonzero = weight != 0
        labels = torch.full(weight.shape, -1, dtype=torch.long, device=weight.device)
        if nonzero.any():
            centroids, member = kmeans_1d(weight[nonzero].cpu(), 2**b, iterations)
            labels[nonzero] = member.to(weight.device)
        else:
            centroids = torch.zeros(2**b)
        shared[name] = SharedWeight(centroids, labels.cpu())
        weight.copy_(shared[name].dense().to(weight))
    return shared


@torch.no_grad()
def tie_weights(model: nn.Module, shared: Mapping[str, SharedWeight]) -> None:
    """Set each centroid to the mean of its weights, then every weight to its centroid (in place)."""
    modules = dict(model.named_modules())
    for name, layer in shared.items():
        weight = modules[name].weight
        labels = layer.labels.to(weight.device)
        kept = labels >= 0
        k = len(layer.centroids)
        sums = torch.zeros(k, device=weight.device).index_add_(0, labels[kept], weight[kept].float())
        counts = torch.bincount(labels[kept], minlength=k).float()
        layer.centroids = torch.where(counts > 0, sums / counts.clamp(min=1), layer.centroids.to(weight.device)).cpu()
        weight.copy_(layer.dense().to(weight))


class CentroidFineTuningHook(Hook):
    """Fine-tune shared centroids: after backward, each shared weight's gradient becomes the sum of its
    cluster's gradients (zero for pruned weights), so every weight of a cluster takes the centroid's update;
    after the optimizer step the weights are re-tied (:func:`tie_weights`) against numerical drift.

    Train with ``trainer.ema.enabled=false``: an EMA copy started before the sharing is not tied to the
    centroids, and :func:`save_compressed` needs the tied ``trainer.model``."""

    def __init__(self, shared: Mapping[str, SharedWeight]) -> None:
        self.shared = dict(shared)

    def after_backward(self, trainer: Trainer) -> None:
        modules = dict(trainer.model.named_modules())
        for name, layer in self.shared.items():
            weight = modules[name].weight
            if weight.grad is None:
                continue
            labels = layer.labels.to(weight.device)
            kept = labels >= 0
            sums = torch.zeros(len(layer.centroids), device=weight.device, dtype=weight.grad.dtype)
            sums.index_add_(0, labels[kept], weight.grad[kept])
            weight.grad.copy_(torch.where(kept, sums[labels.clamp(min=0)], 0.0))

    def after_step(self, trainer: Trainer) -> None:
        tie_weights(trainer.model, self.shared)

    def state_dict(self) -> dict:
        return {name: {"centroids": s.centroids, "labels": s.labels} for name, s in self.shared.items()}

    def load_state_dict(self, state: dict) -> None:
        self.shared = {name: SharedWeight(s["centroids"], s["labels"]) for name, s in state.items()}


def sparse_entries(labels: Tensor, index_bits: int, filler: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR-style relative indexing of a layer's non-zero weights with the paper's padding rule.

    ``labels``: cluster indices, -1 where the weight is zero (any shape, read row-major). Returns
    (gap symbols, value symbols), one per entry: gap symbol = gap - 1 in [0, 2^index_bits), value symbol =
    cluster index, or ``filler`` for a padding entry (a stored zero inserted when a gap exceeds
    2^index_bits)."""
    flat = labels.flatten().numpy()
    positions = np.flatnonzero(flat >= 0)
    gaps = np.diff(positions, prepend=-1)
    span = 2**index_bits
    fillers = (gaps - 1) // span  # padding entries before each non-zero
    per_weight = fillers + 1
    gap_symbols = np.full(int(per_weight.sum()), span - 1, dtype=np.int64)  # a filler's gap is the full span
    last = np.cumsum(per_weight) - 1  # each non-zero's entry comes after its fillers
    gap_symbols[last] = gaps - fillers * span - 1
    value_symbols = np.full(gap_symbols.shape, filler, dtype=np.int64)
    value_symbols[last] = flat[positions]
    return gap_symbols, value_symbols


def dense_from_entries(gap_symbols: np.ndarray, value_symbols: np.ndarray, centroids: Tensor,
                       shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`sparse_entries`: the dense weight (``shape``) with centroids at the stored
    positions and zeros elsewhere (fillers included)."""
    positions = np.cumsum(gap_symbols + 1) - 1
    filler = len(centroids)
    real = value_symbols != filler
    flat = torch.zeros(math.prod(shape), dtype=torch.float32)
    if real.any():
        flat[torch.from_numpy(positions[real])] = centroids.float()[torch.from_numpy(value_symbols[real])]
    return flat.view(shape)


@dataclass
class CompressionReport:
    """Model size in bytes at each Deep Compression stage; layers not compressed (BN, biases, excluded
    layers) count as float32 state in every stage."""

    stages: dict[str, float] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Dense fp32 size / Huffman-coded size."""
        return self.stages["dense fp32"] / self.stages["huffman"]

    def format(self) -> str:
        lines = [f"{'stage':<14} {'MB':>10} {'ratio':>8}"]
        dense = self.stages["dense fp32"]
        lines += [f"{stage:<14} {size / 1e6:>10.4f} {dense / size:>7.1f}x" for stage, size in self.stages.items()]
        lines.append(f"file on disk: {self.file_bytes / 1e6:.4f} MB")
        return "\n".join(lines)


def _as_uint8(payload: bytes) -> Tensor:
    return torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy())


def _lengths_tensor(lengths: Mapping[int, int]) -> Tensor:
    return torch.tensor(sorted(lengths.items()), dtype=torch.int64).reshape(-1, 2)


def save_compressed(model: nn.Module, shared: Mapping[str, SharedWeight], path: str | Path,
                    index_bits: int | Mapping[type, int] | None = None) -> CompressionReport:
    """Write ``model`` with its shared layers Huffman-coded (the rest of the state dict as is) to ``path``
    (a ``torch.save`` file that loads with ``weights_only=True``); return the size at each stage.

    Args:
        shared: from :func:`share_weights` (weights must still be tied to it).
        index_bits: bits of a stored gap: an int, ``{module type: bits}``, or None for the paper's 8 / 5.
    """
    modules = dict(model.named_modules())
    state = model.state_dict()
    missing = sorted(set(shared) - set(modules))
    if missing:
        raise ValueError(f"shared weights name layers the model does not have: {missing[:5]}")
    layers, stage_bits = {}, dict.fromkeys(("pruned CSR", "quantized", "huffman"), 0)
    for name, layer in shared.items():
        b = _bits_for(modules[name], index_bits)
        if not 1 <= b <= 16:
            raise ValueError(f"index_bits must be in 1..16, got {b} for layer {name!r}")
        k = len(layer.centroids)
        gaps, values = sparse_entries(layer.labels.cpu(), b, filler=k)
        gap_payload, gap_lengths = huffman_encode(gaps)
        value_payload, value_lengths = huffman_encode(values)
        layers[name] = {"shape": list(layer.labels.shape), "centroids": layer.centroids.float().cpu(),
                        "count": int(len(gaps)), "gaps": _as_uint8(gap_payload), "gap_lengths": _lengths_tensor(
                            gap_lengths), "values": _as_uint8(value_payload),
                        "value_lengths": _lengths_tensor(value_lengths)}
        value_bits = math.ceil(math.log2(k + int((values == k).any())))
        stage_bits["pruned CSR"] += len(gaps) * (32 + b)
        stage_bits["quantized"] += len(gaps) * (value_bits + b) + 32 * k
        # code tables: one (symbol, length) byte pair per coded symbol
        table = 16 * (len(gap_lengths) + len(value_lengths))
        stage_bits["huffman"] += 8 * (len(gap_payload) + len(value_payload)) + 32 * k + table
    rest = {key: value for key, value in state.items() if key.removesuffix(".weight") not in shared
            or not key.endswith(".weight")}
    rest_bytes = sum(t.numel() * t.element_size() for t in rest.values())
    dense = sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size() for t in state.values())
    torch.save({"format": FORMAT, "layers": layers, "rest": rest}, path)
    stages = {"dense fp32": float(dense)}
    stages.update({stage: rest_bytes + bits / 8 for stage, bits in stage_bits.items()})
    return CompressionReport(stages, Path(path).stat().st_size)


def load_compressed(path: str | Path) -> dict[str, Tensor]:
    """Read a file of :func:`save_compressed` into a dense state dict (shared weights = their centroids)."""
    data = load_torch_file(path, "Deep Compression file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Deep Compression file of detkit (format {FORMAT!r})")
    state = dict(data["rest"])
    for name, layer in data["layers"].items():
        count = layer["count"]
        gaps = huffman_decode(layer["gaps"].numpy().tobytes(), dict(layer["gap_lengths"].tolist()), count)
        values = huffman_decode(layer["values"].numpy().tobytes(), dict(layer["value_lengths"].tolist()), count)
        state[f"{name}.weight"] = dense_from_entries(gaps, values, layer["centroids"], tuple(layer["shape"]))
    return state
