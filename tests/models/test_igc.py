"""Interleaved group convolution: shapes, the parameter formula, the interleave's connectivity, the saving
against a dense 3×3 conv, and the Darknet block option."""

import pytest
import torch
from torch import nn

from detkit.errors import ConfigError
from detkit.models.backbones.cspdarknet import CSPDarknet
from detkit.models.backbones.darknet import Darknet
from detkit.models.igc import InterleavedGroupConv, igc_params, interleave
from detkit.utils.complexity import compare, complexity


@pytest.mark.parametrize("c_in,c_out,L,M,stride", [(32, 32, 4, 8, 1), (32, 32, 8, 4, 2), (16, 32, 4, 4, 1),
                                                   (24, 48, 2, 3, 1), (64, 64, 4, 4, 1)])
def test_shapes_and_parameter_count(c_in, c_out, L, M, stride):
    block = InterleavedGroupConv(c_in, c_out, L, M, stride=stride)
    assert block(torch.rand(2, c_in, 12, 10)).shape == (2, c_out, 12 // stride, 10 // stride)
    params = sum(p.numel() for p in block.parameters())
    assert params == igc_params(c_in, c_out, L, M) == 9 * (c_in // L) * c_out + c_out * (c_out // M)


@pytest.mark.parametrize("L,M", [(4, 8), (8, 4), (2, 16), (32, 1)])
def test_the_papers_case_l_times_m_equals_c(L, M):
    c = L * M
    assert igc_params(c, c, L, M) == c * (9 * M + L)  # the paper's count, against a dense conv's 9·C²
    assert sum(p.numel() for p in InterleavedGroupConv(c, c, L, M).parameters()) == c * (9 * M + L)


def test_interleave_sends_every_primary_group_to_every_secondary_group():
    L, M, c = 4, 3, 24  # C / (L·M) = 2 channels of each primary group per secondary group
    primary_group = torch.arange(c).div(c // L, rounding_mode="floor").float().view(1, c, 1, 1)
    shuffled = interleave(primary_group, L).view(M, c // M)  # rows: the secondary groups' inputs
    for row in shuffled:
        assert sorted(row.tolist()) == sorted(list(range(L)) * (c // (L * M)))
    assert torch.equal(interleave(interleave(primary_group, L), c // L), primary_group)  # the inverse


def test_every_output_channel_depends_on_every_input_channel():
    torch.manual_seed(0)
    block = InterleavedGroupConv(16, 16, 4, 4)
    for conv in (block.primary, block.secondary):
        nn.init.uniform_(conv.weight, 0.1, 1.0)  # positive: no accidental cancellation
    x = torch.zeros(1, 16, 5, 5)
    for channel in range(16):  # one channel of one primary group at a time
        x.zero_()
        x[0, channel, 2, 2] = 1.0
        assert (block(x)[0, :, 2, 2] > 0).all()
    # without the interleave, a primary group's channels would stay inside one secondary group
    plain = block.secondary(block.primary(x))[0, :, 2, 2]
    assert (plain == 0).sum() == 12


def test_saving_against_a_dense_3x3_conv():
    c, L, M, size = 64, 4, 16, 16
    dense = complexity(nn.Conv2d(c, c, 3, 1, 1, bias=False), (1, c, size, size))
    igc = complexity(InterleavedGroupConv(c, c, L, M), (1, c, size, size))
    assert dense.params == 9 * c * c and igc.params == c * (9 * M + L)
    assert dense.flops == 2 * dense.params * size * size and igc.flops == 2 * igc.params * size * size
    assert igc.params / dense.params == pytest.approx((9 * M + L) / (9 * c))  # 0.26 here


def test_darknet_igc_block_option():
    torch.manual_seed(0)
    plain = Darknet((1, 1, 1), 8, num_outputs=2)
    igc = Darknet((1, 1, 1), 8, num_outputs=2, block="igc", igc_groups=[4, 2])
    blocks = [m for m in igc.modules() if isinstance(m, InterleavedGroupConv)]
    assert len(blocks) == 3  # one per residual unit, never the strided downsampling convs
    x = torch.rand(1, 3, 32, 32)
    assert [o.shape for o in igc(x)] == [o.shape for o in plain(x)]
    saved = sum(9 * b.primary.in_channels * b.primary.out_channels - igc_params(
        b.primary.in_channels, b.primary.out_channels, 4, 2) for b in blocks)
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in igc.parameters()) == saved > 0
    table = compare({"plain": plain, "igc": igc}, (1, 3, 32, 32))
    assert "plain" in table and "igc" in table and "1.000" in table
    csp = CSPDarknet((1, 1), 8, num_outputs=1, block="igc", igc_groups=[2, 2])
    assert sum(isinstance(m, InterleavedGroupConv) for m in csp.modules()) == 2
    with pytest.raises(ConfigError, match="L·M = 64"):
        Darknet((1, 1, 1), 8, block="igc", igc_groups=[8, 8])
    with pytest.raises(ConfigError, match="choose one"):
        Darknet((1, 1, 1), 8, block="igc", deform_stages=[0])
    with pytest.raises(ConfigError, match="unknown backbone block"):
        Darknet((1, 1, 1), 8, block="dense")
