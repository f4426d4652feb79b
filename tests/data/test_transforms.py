from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detkit.data.transforms import Letterbox, TrainTransform, letterbox_geometry, unletterbox


def sample(h: int = 120, w: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    boxes = np.array([[10.0, 20.0, 60.0, 90.0], [150.0, 5.0, 199.0, 50.0]], dtype=np.float32)
    return SimpleNamespace(image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), boxes=boxes,
                           labels=np.array([1, 4]), image_id=7, orig_size=(h, w))


@pytest.mark.parametrize(("h", "w"), [(120, 200), (200, 120), (256, 256), (37, 311)])
def test_letterbox_maps_boxes_and_back(h, w):
    s = sample(h, w)
    s.boxes = np.array([[0.0, 0.0, w, h], [w * 0.25, h * 0.5, w * 0.75, h * 0.9]], dtype=np.float32)
    image, target = Letterbox(128)(s, 0)
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    ratio, (left, top) = target["ratio"], target["pad"]
    assert ratio == pytest.approx(128 / max(h, w))
    # The full-image box fills exactly the non-padded area, centred.
    full = target["boxes"][0]
    assert full[0] == left and full[1] == top
    assert abs(full[2] - (128 - left)) <= 1.5 and abs(full[3] - (128 - top)) <= 1.5
    assert full[2] - full[0] == pytest.approx(w * ratio) and full[3] - full[1] == pytest.approx(h * ratio)
    back = unletterbox(target["boxes"], ratio, target["pad"], target["orig_size"])
    assert torch.allclose(back, torch.from_numpy(s.boxes), atol=1e-4)


def test_letterbox_padding_is_grey_and_image_is_centred():
    s = sample(64, 128)
    image, target = Letterbox(128)(s, 0)
    assert target["pad"] == (0.0, 32.0)
    assert torch.allclose(image[:, :32], torch.full_like(image[:, :32], 114 / 255))
    assert torch.allclose(image[:, 96:], torch.full_like(image[:, 96:], 114 / 255))


def test_letterbox_fills_with_darknets_grey_and_keeps_the_image():
    s = sample(64, 128)
    grey, _ = Letterbox(128, fill=127.5)(s, 0)
    default, _ = Letterbox(128)(s, 0)
    assert torch.equal(grey[:, :32], torch.full_like(grey[:, :32], 0.5))  # exactly 0.5, not 127/255 or 128/255
    assert torch.equal(grey[:, 32:96], default[:, 32:96])
    with pytest.raises(ValueError, match="0..255"):
        Letterbox(128, fill=300)


def test_unletterbox_clips_to_the_original_image():
    boxes = torch.tensor([[-10.0, -10.0, 300.0, 300.0]])
    out = unletterbox(boxes, 0.5, (0, 0), (100, 120))
    assert out.tolist() == [[0.0, 0.0, 120.0, 100.0]]


def test_train_transform_depends_only_on_seed_epoch_index():
    t = TrainTransform(128, seed=3, fliplr=0.5)
    a1, ta1 = t(sample(), 5)
    t(sample(), 6)  # other samples in between change nothing
    a2, ta2 = t(sample(), 5)
    assert torch.equal(a1, a2) and torch.equal(ta1["boxes"], ta2["boxes"])
    t.set_epoch(1)
    b, _ = t(sample(), 5)
    assert not torch.equal(a1, b)
    other = TrainTransform(128, seed=4, fliplr=0.5)
    assert not torch.equal(a1, other(sample(), 5)[0])


def test_train_transform_keeps_boxes_on_their_content():
    # A white square on black: after any jitter/flip its box must still frame the white pixels.
    image = np.zeros((100, 160, 3), dtype=np.uint8)
    image[30:60, 40:80] = 255
    s = SimpleNamespace(image=image, boxes=np.array([[40.0, 30.0, 80.0, 60.0]], dtype=np.float32),
                        labels=np.array([0]), image_id=1, orig_size=(100, 160))
    t = TrainTransform(128, seed=0, fliplr=0.5, hue=0.0, saturation=0.0, value=0.0)
    for index in range(20):
        out, target = t(s, index)
        if len(target["boxes"]) == 0:
            continue
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        white = (out.mean(0) > 0.9).nonzero()
        assert abs(white[:, 1].min().item() - x1) <= 1.5 and abs(white[:, 1].max().item() + 1 - x2) <= 1.5
        assert abs(white[:, 0].min().item() - y1) <= 1.5 and abs(white[:, 0].max().item() + 1 - y2) <= 1.5


def test_letterbox_geometry_scale_jitter():
    ratio, left, top = letterbox_geometry(100, 200, 128, scale=1.5)
    assert ratio == pytest.approx(0.96) and left == (128 - 192) // 2


@pytest.mark.parametrize(("h", "w"), [(120, 200), (333, 250), (90, 600)])
def test_shorter_side_resizes_as_torchvisions_rcnn_transform_and_maps_boxes_back(h, w):
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    s = sample(h, w)
    s.boxes = np.array([[0.0, 0.0, w, h], [w * 0.25, h * 0.5, w * 0.75, h * 0.9]], dtype=np.float32)
    image, target = Letterbox(160, mode="shorter_side", max_size=400)(s, 0)
    reference = GeneralizedRCNNTransform(160, 400, [0.0] * 3, [1.0] * 3)
    reference.eval()
    images, _ = reference([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255])
    assert tuple(image.shape[-2:]) == tuple(images.image_sizes[0])  # same resized size, no canvas
    assert torch.allclose(image, images.tensors[0, :, :image.shape[1], :image.shape[2]], atol=2 / 255)
    rx, ry = target["ratio"]
    assert target["boxes"][0].tolist() == pytest.approx([0, 0, w * rx, h * ry], abs=1e-3)
    back = unletterbox(target["boxes"], target["ratio"], target["pad"], target["orig_size"])
    assert torch.allclose(back, torch.from_numpy(s.boxes), atol=1e-3)


def test_stretch_fills_the_square_and_maps_boxes_back():
    s = sample(64, 128)
    s.boxes = np.array([[10.0, 20.0, 60.0, 50.0], [100.0, 5.0, 127.0, 64.0]], dtype=np.float32)
    image, target = Letterbox(96, mode="stretch")(s, 0)
    assert image.shape == (3, 96, 96) and target["ratio"] == (0.75, 1.5) and target["pad"] == (0.0, 0.0)
    back = unletterbox(target["boxes"], target["ratio"], target["pad"], target["orig_size"])
    assert torch.allclose(back, torch.from_numpy(s.boxes), atol=1e-4)
    with pytest.raises(ValueError, match="data.resize must be one of"):
        Letterbox(96, mode="crop")


def test_rcnn_batches_of_different_sizes_are_padded_as_torchvision_pads_them():
    from detkit.data.loader import collate
    from detkit.models.detectors.common import batch_images

    a, b = torch.rand(3, 40, 56), torch.rand(3, 48, 30)
    images, _ = collate([(a, {}), (b, {})])
    assert isinstance(images, list)  # sizes differ: the model pads them
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    x = batch_images(images, mean, std, 32)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0, :, :40, :56], (a - mean[0]) / std[0]) and (x[0, :, 40:] == 0).all()
    assert torch.allclose(x[1, :, :48, :30], (b - mean[0]) / std[0]) and (x[1, :, :, 30:] == 0).all()
