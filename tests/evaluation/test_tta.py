"""Test-time augmentation: views map back to the input frame and merge by class-aware NMS."""

import torch
from torch import nn

from detkit.evaluation.tta import TestTimeAugmentation


class RelativeBoxDetector(nn.Module):
    """Detects one box at fixed fractions of whatever image it gets: x 10-30%, y 20-40% of the size."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images):
        h, w = images.shape[-2:]
        self.sizes.append((h, w))
        box = torch.tensor([[0.1 * w, 0.2 * h, 0.3 * w, 0.4 * h]])
        return [{"boxes": box.clone(), "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}
                for _ in range(images.shape[0])]


def test_views_map_back_and_merge():
    detector = RelativeBoxDetector()
    tta = TestTimeAugmentation(detector, scales=(0.5, 1.5), flip=True)
    out = tta(torch.zeros(2, 3, 64, 128))
    # Views: the input, its mirror, 32x64 and 96x192 (multiples of the stride 32).
    assert detector.sizes == [(64, 128), (64, 128), (32, 64), (96, 192)]
    # The scaled views find the same box as the input (merged by NMS); the mirror finds the mirrored spot:
    # x 10-30% of a mirrored image is x 70-90% of the input.
    for det in out:
        assert len(det["boxes"]) == 2 and det["labels"].tolist() == [2, 2]
        expected = torch.tensor([[12.8, 12.8, 38.4, 25.6], [89.6, 12.8, 115.2, 25.6]])
        got = det["boxes"][det["boxes"][:, 0].argsort()]
        torch.testing.assert_close(got, expected)


def test_no_flip_keeps_one_box():
    out = TestTimeAugmentation(RelativeBoxDetector(), scales=(0.75,), flip=False)(torch.zeros(1, 3, 64, 64))
    assert len(out[0]["boxes"]) == 1
