"""Test-time augmentation: views map back to the input frame and merge by class-aware NMS."""

import torch
from torch import nn

from detkit.evaluation.tta import TestTimeAugmentation, merge_detections, to_input_frame


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


class BrightRegionDetector(nn.Module):
    """Detects the bounding box of the pixels of channel 0 brighter than 0.5 (class 1, score 0.8)."""

    def forward(self, images):
        out = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": box, "scores": torch.tensor([0.8]), "labels": torch.tensor([1])})
        return out


def test_merging_identical_prediction_sets_changes_nothing():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 5, 40, 30], [50, 50, 60, 70], [21, 6, 39, 31]])
    single = {"boxes": boxes, "scores": torch.tensor([0.9, 0.7, 0.6, 0.4, 0.3]),
              "labels": torch.tensor([0, 2, 0, 1, 2])}  # the same box twice in two classes: class-aware NMS keeps both
    for n in (1, 2, 5):
        merged = merge_detections([{k: v.clone() for k, v in single.items()} for _ in range(n)])
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(merged[key], single[key], rtol=0, atol=0)


def test_a_flipped_view_maps_back_onto_the_input():
    image = torch.zeros(1, 3, 64, 96)
    image[:, 0, 5:20, 10:30] = 1.0  # off-centre: the mirror image's box is elsewhere
    detector = BrightRegionDetector()
    mirrored = detector(image.flip(-1))[0]["boxes"]
    torch.testing.assert_close(mirrored, torch.tensor([[66.0, 5, 86, 20]]))
    torch.testing.assert_close(to_input_frame(mirrored, 1.0, 1.0, True, 96), torch.tensor([[10.0, 5, 30, 20]]))
    # the two views agree once mapped back, so the merged set is the single box
    out = TestTimeAugmentation(detector, scales=(), flip=True)(image)[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[10.0, 5, 30, 20]]))
    assert out["labels"].tolist() == [1]
