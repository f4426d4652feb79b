"""Deep Compression: Huffman round trip, CSR gaps with overflow padding, weight sharing, centroid fine-tuning
and the compressed file's round trip."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detkit.compression.deep_compression import (
    CentroidFineTuningHook,
    dense_from_entries,
    kmeans_1d,
    load_compressed,
    save_compressed,
    share_weights,
    sparse_entries,
)
from detkit.compression.huffman import code_lengths, huffman_decode, huffman_encode
from detkit.compression.magnitude import prune_by_magnitude


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=300))
def test_huffman_decodes_exactly_and_is_no_longer_than_fixed_width(symbols):
    payload, lengths = huffman_encode(symbols)
    assert huffman_decode(payload, lengths, len(symbols)).tolist() == symbols
    if len(set(symbols)) > 1:
        fixed = len(symbols) * int(np.ceil(np.log2(len(set(symbols)))))
        assert sum(lengths[s] for s in symbols) <= fixed
        assert sum(2.0 ** -n for n in lengths.values()) == pytest.approx(1.0)  # a complete prefix code


def test_huffman_gives_frequent_symbols_short_codes():
    lengths = code_lengths({0: 100, 1: 10, 2: 5, 3: 1})
    assert lengths[0] == 1 and lengths[3] == 3


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(-1, 7), min_size=1, max_size=200), st.integers(0, 2**32 - 1))
def test_sparse_entries_round_trip_with_gap_overflow_padding(index_bits, labels, seed):
    labels = torch.tensor(labels)
    # long zero runs, so that gaps overflow 2^index_bits
    labels[torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < 0.7] = -1
    centroids = torch.arange(1.0, 9.0)
    gaps, values = sparse_entries(labels, index_bits, filler=8)
    assert gaps.min(initial=0) >= 0 and gaps.max(initial=0) < 2**index_bits
    positions = np.flatnonzero(labels.numpy() >= 0)
    expected_fillers = int(((np.diff(positions, prepend=-1) - 1) // 2**index_bits).sum())
    assert int((values == 8).sum()) == expected_fillers
    dense = dense_from_entries(gaps, values, centroids, tuple(labels.shape))
    assert torch.equal(dense, torch.where(labels >= 0, centroids[labels.clamp(min=0)], 0.0))


def test_kmeans_uses_linear_init_and_separates_clear_clusters():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    centroids, labels = kmeans_1d(values, 4)
    assert centroids[0] == -1.0 and centroids[-1] == 2.0
    assert torch.equal(centroids[labels], values)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_round_trip_restores_the_quantized_centroids_and_reports_each_stage(tmp_path):
    model = net()
    prune_by_magnitude(model, 0.9)
    shared = share_weights(model, bits=4, iterations=10)
    for name, module in [("0", model[0]), ("5", model[5])]:
        assert len(torch.unique(module.weight)) <= 2**4 + 1  # 16 centroids and the pruned zeros
        assert torch.equal(module.weight, shared[name].dense())
    report = save_compressed(model, shared, tmp_path / "m.dkc", index_bits=3)
    state = load_compressed(tmp_path / "m.dkc")
    reference = model.state_dict()
    assert state.keys() == reference.keys()
    for key in reference:
        assert torch.equal(state[key], reference[key]), key
    restored = net()
    restored.load_state_dict(state)
    sizes = list(report.stages.values())
    assert sizes == sorted(sizes, reverse=True) and report.ratio > 5
    assert "huffman" in report.format()


def test_centroid_fine_tuning_keeps_weights_tied_and_moves_centroids():
    model = net()
    prune_by_magnitude(model, 0.5)
    shared = share_weights(model, bits=3, iterations=10)
    before = {n: s.centroids.clone() for n, s in shared.items()}
    hook = CentroidFineTuningHook(shared)
    trainer = SimpleNamespace(model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 4, 4)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        hook.after_backward(trainer)
        optimizer.step()
        hook.after_step(trainer)
    modules = dict(model.named_modules())
    for name, layer in hook.shared.items():
        assert torch.equal(modules[name].weight, layer.dense())
        assert (modules[name].weight[layer.labels < 0] == 0).all()
        assert not torch.equal(layer.centroids, before[name])


def test_load_rejects_other_files(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a Deep Compression file"):
        load_compressed(tmp_path / "x.pt")
