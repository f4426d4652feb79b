import pytest
import torch
from torch import nn

from detkit.utils.complexity import complexity


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.down(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("size", [32, 48])
def test_flops_of_a_small_conv_net_equal_the_analytic_formula(size):
    net = SmallNet()
    result = complexity(net, (2, 3, size, size))
    stem = 2 * 3 * 8 * 3 * 3 * size * size * 2  # 2·C_in·C_out·k²·H·W per image, batch 2
    down = 2 * 8 * 16 * 3 * 3 * (size // 2) ** 2 * 2
    head = 2 * 16 * 5 * 2
    assert result.per_module["stem"] == (3 * 8 * 9 + 8, stem)
    assert result.per_module["down"] == (8 * 16 * 9 + 16, down)
    assert result.per_module["head"] == (16 * 5 + 5, head)
    assert result.flops == stem + down + head
    assert result.params == sum(p.numel() for p in net.parameters())
    assert net.training  # mode restored
    assert "GFLOPs" in result.format()


def conv_and_linear_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """An independent count: 2·(C_in/groups)·C_out·k² per output pixel of every Conv2d, 2·in·out per row of
    every Linear, read from the shapes each layer produces in one eval-mode forward."""
    total = 0

    def count(module, args, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels // module.groups * k * out.numel()
        else:
            total += 2 * module.in_features * out.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_shape))
    for handle in handles:
        handle.remove()
    return total


def test_the_default_detector_is_counted_in_eval_mode_with_its_postprocess():
    from detkit.app.build import build_model
    from tests.conftest import compose_config

    model = build_model(compose_config("train").model, 10)
    result = complexity(model, (1, 3, 320, 320))
    assert result.params == sum(p.numel() for p in model.parameters())
    assert model.training  # mode restored
    assert result.flops == conv_and_linear_flops(model, (1, 3, 320, 320)) > 1e8
