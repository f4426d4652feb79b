"""Deformable convolution and deformable RoI pooling v1: zero offsets reproduce the regular layers exactly
(alone and inside the backbones), known offsets give known shifts, and the offsets receive gradients."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from detkit.errors import ConfigError
from detkit.models.backbones.cspdarknet import CSPDarknet
from detkit.models.backbones.darknet import Darknet
from detkit.models.backbones.resnet import ResNet
from detkit.models.deformable import DeformableConv2d, DeformableRoIPooler, deformable_roi_align
from detkit.models.roi_heads import SingleLevelPooler
from detkit.utils.complexity import complexity


def random_conv(c_in=4, c_out=6, stride=1, bias=True):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias)


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_zero_offsets_are_the_plain_conv(stride, bias):
    conv = random_conv(stride=stride, bias=bias)
    deform = DeformableConv2d.from_conv(conv)
    assert not deform.offset.weight.any() and not deform.offset.bias.any()
    x = torch.randn(2, 4, 11, 9)
    torch.testing.assert_close(deform(x), conv(x), rtol=1e-5, atol=1e-5)
    # the same weights under the same names: a plain conv's state dict loads with only the offsets missing
    missing = DeformableConv2d(4, 6, 3, stride, 1, bias=bias).load_state_dict(conv.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"offset.weight", "offset.bias"} and not missing.unexpected_keys


def test_a_constant_offset_of_one_pixel_shifts_the_sampling_grid():
    conv = random_conv()
    deform = DeformableConv2d.from_conv(conv)
    with torch.no_grad():
        deform.offset.bias.view(9, 2)[:, 1] = 1.0  # (Δy, Δx) per kernel point: every point one pixel right
    x = torch.randn(1, 4, 8, 10)
    out = deform(x)
    assert not torch.allclose(out, conv(x), atol=1e-3)
    # the output at column j is the plain conv's at column j + 1
    torch.testing.assert_close(out[..., :-1], conv(x)[..., 1:], rtol=1e-5, atol=1e-5)


def test_the_offset_conv_receives_a_gradient_at_zero_init():
    deform = DeformableConv2d.from_conv(random_conv())
    deform(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert deform.offset.weight.grad.abs().sum() > 0 and deform.offset.bias.grad.abs().sum() > 0


def test_complexity_counts_a_deformable_conv_as_its_conv_plus_the_offset_conv():
    model = nn.Sequential(DeformableConv2d(4, 6, 3, 1, 1))
    size = 16
    flops = complexity(model, (1, 4, size, size)).flops
    assert flops == 2 * 4 * 9 * size * size * (6 + 18)  # main conv (6 outputs) + offset conv (2·9 outputs)


def plain_and_deformable(build, stages, x):
    """Outputs of the backbone ``build(None)`` and of ``build(stages)`` loaded with the plain one's weights."""
    torch.manual_seed(0)
    plain = build(None).eval()
    deform = build(stages).eval()
    result = deform.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys and all(".offset." in key for key in result.missing_keys)
    assert not result.unexpected_keys
    with torch.no_grad():
        return plain(x), deform(x), deform


@pytest.mark.parametrize("name", ["darknet", "cspdarknet"])
def test_darknet_deform_stages_start_as_the_plain_backbone(name):
    cls = Darknet if name == "darknet" else CSPDarknet
    plain_out, deform_out, model = plain_and_deformable(
        lambda stages: cls((1, 1, 2), 8, num_outputs=2, deform_stages=stages), [1, 2], torch.rand(2, 3, 64, 64))
    for a, b in zip(plain_out, deform_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    deformable = [n for n, m in model.named_modules() if isinstance(m, DeformableConv2d)]
    # stages 1 and 2: the residual units' 3×3 convs only (1 + 2 units), never a strided downsampling conv
    assert len(deformable) == 3 and all(n.startswith(("stages.1.", "stages.2.")) for n in deformable)
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, DeformableConv2d))


@pytest.mark.parametrize("depth,width,expected", [(18, 16, 4), (50, 8, 2)])
def test_resnet_deform_stages_start_as_the_plain_backbone(depth, width, expected):
    plain_out, deform_out, model = plain_and_deformable(
        lambda stages: ResNet(depth, width, depths=[1, 1, 1, 2], deform_stages=stages), [3],
        torch.rand(1, 3, 64, 64))
    for a, b in zip(plain_out, deform_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # C5's two blocks: both 3×3 convs of a basic block, a bottleneck's conv2 (the first one strided)
    deformable = [m for m in model.stages[3].modules() if isinstance(m, DeformableConv2d)]
    assert len(deformable) == expected and deformable[0].stride == (2, 2)


def test_standard_resnet_keeps_loading_torchvision_weights_with_deform_stages():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    model = ResNet(18, deform_stages=[2, 3]).eval()  # torchvision's own modules, with convs swapped
    model.load_torchvision_state(reference.state_dict())
    assert not any(m.offset.weight.any() for m in model.modules() if isinstance(m, DeformableConv2d))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
        torch.testing.assert_close(model(x)[-1], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="deform_stages"):
        ResNet(18, 8, depths=[1, 1, 1, 1], deform_stages=[4])


def random_rois(count=40, images=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(count, 2, generator=g) * 200 - 20
    boxes = torch.cat([start, start + 4 + torch.rand(count, 2, generator=g) * 120], dim=1)
    return torch.cat([torch.randint(0, images, (count, 1), generator=g).float(), boxes], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_deformable_roi_align_with_zero_offsets_is_roi_align(aligned, sampling_ratio):
    torch.manual_seed(0)
    x, rois = torch.randn(2, 5, 13, 17), random_rois()
    offsets = torch.zeros(len(rois), 7, 7, 2)
    out = deformable_roi_align(x, rois, offsets, 7, 1 / 16, sampling_ratio, aligned)
    torch.testing.assert_close(out, roi_align(x, rois, 7, 1 / 16, sampling_ratio, aligned), rtol=1e-4, atol=1e-5)


def test_a_common_bin_offset_is_roi_align_of_the_shifted_box():
    torch.manual_seed(0)
    x, rois = torch.randn(2, 5, 13, 17), random_rois()
    shift = torch.tensor([9.0, -5.0])  # (Δx, Δy) input pixels
    out = deformable_roi_align(x, rois, shift.expand(len(rois), 7, 7, 2), 7, 1 / 16)
    moved = rois + torch.cat([torch.zeros(1), shift, shift])
    torch.testing.assert_close(out, roi_align(x, moved, 7, 1 / 16, 2, True), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, roi_align(x, rois, 7, 1 / 16, 2, True), atol=1e-3)


def test_single_level_deformable_pooler_starts_as_roi_align_and_learns_offsets():
    torch.manual_seed(0)
    x, rois = torch.randn(2, 8, 16, 16), random_rois(30)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    plain = SingleLevelPooler("roi_align", 7, 1 / 16)
    pooler = DeformableRoIPooler(plain, 8)
    out = pooler(x, per_image)
    torch.testing.assert_close(out, plain(x, per_image), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert pooler.offset.weight.grad.abs().sum() > 0 and pooler.offset.bias.grad.abs().sum() > 0
    # offsets scale with the RoI: normalised (0.5, 0) is γ·0.5·w pixels to the right for every bin
    with torch.no_grad():
        pooler.offset.bias.view(7, 7, 2)[..., 0] = 0.5
        boxes = torch.cat(per_image)
        offsets = pooler.bin_offsets(plain(x, per_image), per_image)
    torch.testing.assert_close(offsets[:, 3, 4, 0], 0.1 * 0.5 * (boxes[:, 2] - boxes[:, 0]))
    assert not offsets[..., 1].any()
    with pytest.raises(ConfigError, match="roi_align"):
        DeformableRoIPooler(SingleLevelPooler("roi_pool", 7, 1 / 16), 8)


def test_multi_level_deformable_pooler_starts_as_multiscale_roi_align():
    torch.manual_seed(0)
    features = OrderedDict((f"p{i}", torch.randn(2, 4, 512 // 2**i, 512 // 2**i)) for i in range(2, 6))
    rois = random_rois(60, seed=2)
    rois[:, 1:] = (rois[:, 1:] * 3).clamp(0, 511)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    plain = MultiScaleRoIAlign(list(features), 7, 2)
    pooler = DeformableRoIPooler(MultiScaleRoIAlign(list(features), 7, 2), 4)
    expected = plain(features, per_image, [(512, 512)] * 2)
    assert len(set(plain.map_levels(per_image).tolist())) >= 3  # the RoIs span several levels
    torch.testing.assert_close(pooler(features, per_image, [(512, 512)] * 2), expected, rtol=1e-4, atol=1e-5)


def test_both_layers_run_under_bfloat16_autocast():
    # the trainer's CPU precision: torchvision's CPU deform kernel has no bfloat16, the layer computes in float32
    torch.manual_seed(0)
    conv = random_conv()
    deform = DeformableConv2d.from_conv(conv)
    pooler = DeformableRoIPooler(SingleLevelPooler("roi_align", 7, 1 / 16), 6)
    x = torch.randn(2, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = deform(x.bfloat16())
        pooled = pooler(y, [torch.tensor([[0.0, 0.0, 100.0, 120.0]]), torch.tensor([[30.0, 40.0, 90.0, 70.0]])])
    assert y.dtype == torch.bfloat16 and pooled.shape == (2, 6, 7, 7) and torch.isfinite(pooled).all()


def test_complexity_attributes_a_deformable_conv_to_its_module():
    body = nn.Sequential(DeformableConv2d(4, 6, 3, 1, 1))
    model = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, 1, 1), body=body))
    result = complexity(model, (1, 3, 8, 8))
    assert result.per_module["body"][1] == 2 * 4 * 9 * 64 * (6 + 18)  # once: the offset conv is not counted twice
    assert result.per_module["stem"][1] + result.per_module["body"][1] == result.flops
