"""Network Slimming's physical channel pruning: exactness, β compensation, the whole zoo at 50%, channel specs."""

import pytest
import torch
from torch import nn

from detkit.compression.channels import apply_channel_spec
from detkit.compression.graph import channel_groups, example_images
from detkit.compression.pruning import prune_model
from tests.compression.slim_helpers import build_detector
from tests.conftest import CONFIGS

COMPACT = ("model.backbone.width=8", "model.backbone.depths=[1,1,1,1]")


def test_ratio_zero_changes_nothing_bit_for_bit():
    model = build_detector("yolov3_compact", *COMPACT)
    images = example_images(64, batch=2)
    before = [o.clone() for o in model.raw_outputs(images)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_model(model, ratio=0.0, images=images[:1])
    assert result.removed == 0 and result.channel_spec == [] and result.prunable > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.raw_outputs(images)))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _zero_some_gammas(model: nn.Module, names: list[str]) -> int:
    modules = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for name in names:
            bn = modules[name]
            idxs = torch.arange(1, bn.num_features, 3)  # a third of the channels, first one kept
            bn.weight[idxs] = 0.0
            zeroed += len(idxs)
    return zeroed


@pytest.mark.parametrize("compensate", [True, False])
def test_removing_zero_gamma_channels_keeps_the_outputs_thanks_to_beta_compensation(compensate):
    model = build_detector("yolov3_compact", *COMPACT)
    # Channels read by 1×1 convs only: the heads' hidden layers (read by the prediction convs) and the neck's
    # lateral reductions (upsampled and concatenated into a 1×1 conv).
    names = [f"heads.{i}.0.1" for i in range(3)] + [f"neck.reduce.{i}.1" for i in range(2)]
    zeroed = _zero_some_gammas(model, names)
    images = example_images(64, batch=2)
    before = model.raw_outputs(images)
    result = prune_model(model, threshold=0.0, min_channels=1, compensate=compensate, images=images[:1])
    assert result.removed == zeroed
    after = model.raw_outputs(images)
    modules = dict(model.named_modules())
    assert all(modules[n].num_features < 2 * zeroed for n in names)
    error = max((a - b).abs().max().item() for a, b in zip(before, after))
    if compensate:
        assert error < 1e-5
    else:  # the constant act(β) of the removed channels mattered
        assert error > 1e-3


ZOO = [
    ("yolov1_cpu", ("model.input_size=64",), 64),
    ("yolov2_cpu", (), 64),
    ("yolov3_cpu", (), 64),
    ("yolov3_spp_cpu", (), 64),
    ("yolov4_cpu", (), 64),
    ("yolov3_compact", ("model.backbone.width=8",), 64),
    ("ssdlite", ("model.backbone.width=0.25", "model.backbone.extra_channels=[64,32,32,16]"), 128),
    ("fast_rcnn_cpu", ("model.backbone.width=8",), 64),
    ("gcnn_cpu", ("model.backbone.width=8",), 64),
    ("fpn_rcnn_cpu", ("model.backbone.width=8",), 64),
    ("retinanet_cpu", ("model.backbone.width=8",), 64),
]


def _targets(batch: int, size: int) -> list[dict]:
    s = size
    return [{"boxes": torch.tensor([[0.1 * s, 0.2 * s, 0.6 * s, 0.7 * s], [0.5 * s, 0.4 * s, 0.9 * s, 0.95 * s]]),
             "labels": torch.tensor([0, 2])} for _ in range(batch)]


def _output_shapes(model: nn.Module, images: torch.Tensor, output_convs: list[str]) -> dict[str, tuple]:
    modules, shapes = dict(model.named_modules()), {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
               for n in output_convs]
    with torch.no_grad():
        model.eval()(images)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("name, overrides, size", ZOO, ids=[z[0] for z in ZOO])
def test_every_zoo_detector_prunes_to_half_and_still_trains(name, overrides, size):
    if not (CONFIGS / "model" / f"{name}.yaml").is_file():
        pytest.skip(f"configs/model/{name}.yaml not written yet")
    model = build_detector(name, *overrides)
    images = example_images(size, batch=2)
    groups = channel_groups(model, images[:1])
    # the heads' prediction convolutions (and fully connected layers, which are never pruned at the output)
    outputs = [g.root for g in groups if g.reason.startswith("output convolution")]
    outputs += [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert outputs
    before = _output_shapes(model, images, outputs)
    params = sum(p.numel() for p in model.parameters())
    result = prune_model(model, ratio=0.5, images=images[:1])
    if result.prunable == 0:  # BatchNorm-free heads and necks: nothing to rank, said per group
        assert all(reason for _, reason in result.skipped)
        return
    assert 0.5 <= result.removed_fraction <= 0.6 and sum(p.numel() for p in model.parameters()) < params
    assert _output_shapes(model, images, outputs) == before
    model.train()
    losses = model(images, _targets(2, size))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.grad is not None)


def test_batchnorm_free_layers_are_left_whole_with_a_warning():
    model = build_detector("ssd300", "model.backbone.width=0.125")
    params = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match="BatchNorm-free"):
        result = prune_model(model, ratio=0.5, images=example_images(300))
    assert result.prunable == 0 and result.removed == 0 and sum(p.numel() for p in model.parameters()) == params
    assert any(reason.startswith("no BatchNorm") for _, reason in result.skipped)


def test_no_group_is_emptied_and_kept_counts_round_to_eight():
    model = build_detector("yolov3_compact", "model.backbone.width=16")
    result = prune_model(model, ratio=0.9, min_channels=8, max_layer_ratio=0.75, round_to=8,
                         images=example_images(64))
    assert result.groups and all(kept >= max(min(8, c), c // 4) for _, c, kept in result.groups)
    assert all(kept % 8 == 0 or kept == c for _, c, kept in result.groups)


def test_a_channel_spec_rebuilds_the_pruned_architecture():
    pruned = build_detector("yolov3_compact", *COMPACT)
    result = prune_model(pruned, ratio=0.5, images=example_images(64))
    fresh = apply_channel_spec(build_detector("yolov3_compact", *COMPACT, seed=1), result.channel_spec)
    fresh.load_state_dict(pruned.state_dict())
    images = example_images(64, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(pruned.raw_outputs(images), fresh.raw_outputs(images)))


@pytest.mark.parametrize("spec, message", [
    ([["backbone.nope", 4]], "not a convolution"),
    ([["backbone.stem.0", 999]], "has 8"),
    ({"backbone.stem.0": 4}, "list of"),
    ([["backbone.stem.0"]], "pairs"),
])
def test_a_bad_channel_spec_is_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        apply_channel_spec(build_detector("yolov3_compact", *COMPACT), spec)
