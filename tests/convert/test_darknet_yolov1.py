"""YOLOv1 as darknet's yolov1.cfg (configs/model/yolov1_darknet.yaml): the locally connected layer, the [local] and
[connected] weights of a .weights file, raw outputs equal to darknet's layer semantics
(tests/convert/darknet_reference.py), darknet's detection-layer decoding, training, and the converter tool."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import detkit
from detkit.app.build import build_model
from detkit.convert.darknet import (
    DARKNET_BN_EPS,
    ConvertError,
    LayerUnit,
    Unit,
    darknet_parameter_count,
    layout,
    load_weights,
    save_weights,
)
from detkit.data.voc import VOC_CLASSES
from detkit.models.detectors.yolov1 import cells_to_darknet, darknet_to_cells
from detkit.models.layers import LocallyConnected2d
from tests.conftest import CHECKOUT_ENV, compose_config
from tests.convert.darknet_reference import DarknetReference, parse_cfg, spatial_sizes, yolov1_cfg
from tests.convert.test_darknet import write_darknet

ROOT = Path(__file__).resolve().parents[2]
# A small yolov1.cfg: 128 px (a 2×2 map into the local layer), grid 3, 3 boxes, 4 classes.
WIDTH, REPEATS, SIZE, GRID, BOXES, CLASSES, LOCAL = 8, (1, 1), 128, 3, 3, 4, 6
SMALL = [f"model.width={WIDTH}", f"model.repeats=[{REPEATS[0]},{REPEATS[1]}]", f"model.input_size={SIZE}",
         f"model.grid={GRID}", f"model.local_filters={LOCAL}"]


def small_yolov1(num_classes: int = CLASSES, *overrides: str):
    torch.manual_seed(0)
    return build_model(compose_config("train", ["model=yolov1_darknet", *SMALL, *overrides]).model, num_classes)


def write_v1(path: Path, values: np.ndarray) -> Path:
    """A .weights file with the short header (version 0.1.0, int32 `seen`) of the YOLOv1-era files."""
    return write_darknet(path, values, 0, 1, 0, seen=321)


def random_values(model, seed: int = 0) -> np.ndarray:
    """As many values as the model's darknet file holds, at scales that keep activations O(1); BN variances
    positive."""
    rng = np.random.default_rng(seed)
    chunks = []
    for unit in layout(model):
        tensors = unit.tensors()
        if isinstance(unit, Unit) and unit.bn is not None:
            n = unit.conv.out_channels
            chunks += [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
        else:
            chunks.append(rng.normal(0, 0.1, tensors[0].numel()))
        weight = tensors[-1]
        fan_in = weight[0].numel() if isinstance(unit, Unit) or weight.dim() == 2 else weight[0, 0].numel()
        chunks.append(rng.normal(0, (2.0 / fan_in) ** 0.5, weight.numel()))
    return np.concatenate(chunks).astype(np.float32)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_the_locally_connected_layer_is_one_convolution_per_output_position(stride, padding):
    torch.manual_seed(0)
    layer = LocallyConnected2d(5, 4, 3, (5, 6), stride=stride, padding=padding)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 5, 5, 6)
    out = layer(x)
    out_h, out_w = (5 + 2 * padding - 3) // stride + 1, (6 + 2 * padding - 3) // stride + 1
    assert out.shape == (2, 4, out_h, out_w) and layer.weight.shape == (out_h * out_w, 4, 5, 3, 3)
    padded = F.pad(x, (padding,) * 4)
    for y in range(out_h):
        for x_ in range(out_w):
            patch = padded[:, :, y * stride:y * stride + 3, x_ * stride:x_ * stride + 3]
            expected = F.conv2d(patch, layer.weight[y * out_w + x_])[:, :, 0, 0] + layer.bias[:, y, x_]
            torch.testing.assert_close(out[:, :, y, x_], expected, atol=1e-5, rtol=1e-5)
    # the kernels are not shared: changing one position's kernel changes that position only
    with torch.no_grad():
        layer.weight[0].add_(1.0)
    changed = (layer(x) - out).abs().amax(dim=(0, 1)) > 1e-6
    assert changed[0, 0] and changed.sum() == 1
    with pytest.raises(ValueError, match=r"built for 5×6 inputs, got \(6, 6\)"):
        layer(torch.randn(1, 5, 6, 6))


def test_darknet_output_order_round_trips_and_puts_every_value_in_its_cell():
    n, s, b, c = 2, GRID, BOXES, CLASSES
    flat = torch.randn(n, s * s * (c + 5 * b))
    cells = darknet_to_cells(flat, s, b, c)
    assert cells.shape == (n, s, s, 5 * b + c) and torch.equal(cells_to_darknet(cells, b), flat)
    for row in range(s):
        for col in range(s):
            i = row * s + col  # darknet's cell index
            assert torch.equal(cells[:, row, col, 5 * b:], flat[:, i * c:(i + 1) * c])
            for k in range(b):
                assert torch.equal(cells[:, row, col, 5 * k + 4], flat[:, s * s * c + i * b + k])
                start = s * s * (c + b) + (i * b + k) * 4
                assert torch.equal(cells[:, row, col, 5 * k:5 * k + 4], flat[:, start:start + 4])


def cfg_value_counts(cfg: str) -> tuple[int, int]:
    """(darknet's parameter count, the float count of its .weights file) of a yolov1-style cfg, from its text:
    conv kernels + BN γ, β (+ running mean, variance in the file), local and connected weights and biases."""
    sections = parse_cfg(cfg)
    sizes = [(int(sections[0]["height"]), int(sections[0]["width"])), *spatial_sizes(sections)]
    channels, params, stats = 3, 0, 0
    for index, section in enumerate(sections[1:]):
        kind = section["type"]
        if kind == "convolutional":
            filters, k = int(section["filters"]), int(section["size"])
            params += filters * channels * k * k + 2 * filters
            stats += 2 * filters
            channels = filters
        elif kind == "local":
            filters, k = int(section["filters"]), int(section["size"])
            out_h, out_w = sizes[index + 1]
            params += out_h * out_w * filters * (channels * k * k + 1)
            channels = filters
        elif kind == "connected":
            h, w = sizes[index]
            params += int(section["output"]) * (channels * h * w + 1)
            channels = int(section["output"])
    return params, params + stats


def test_the_full_yolov1_darknet_has_yolov1_cfgs_layers_and_counts():
    model = build_model(compose_config("train", ["model=yolov1_darknet"]).model, 20)
    units = layout(model)
    assert [u.kind for u in units] == ["convolution"] * 24 + ["local layer", "connected layer"]
    assert all(u.bn is not None for u in units[:24])  # batch_normalize=1 on every conv of yolov1.cfg
    local, connected = model.head[0], model.head[-1]
    assert local.weight.shape == (49, 256, 1024, 3, 3) and local.bias.shape == (256, 7, 7)
    assert connected.weight.shape == (7 * 7 * (20 + 3 * 5), 7 * 7 * 256)
    params, floats = cfg_value_counts(yolov1_cfg(64, (4, 2), 20, 448))
    assert darknet_parameter_count(model) == params
    assert sum(u.size for u in units) == floats  # the size of yolov1.weights' body


def test_a_yolov1_file_loads_bit_exactly_and_saves_back_to_the_same_bytes(tmp_path):
    model = small_yolov1()
    values = random_values(model)
    path = write_v1(tmp_path / "small.weights", values)
    header = load_weights(model, path)
    assert (header.major, header.minor, header.seen) == (0, 1, 321)
    offset = 0
    for unit in layout(model):
        for tensor in unit.tensors():
            n = tensor.numel()
            assert torch.equal(tensor.detach().flatten(), torch.from_numpy(values[offset:offset + n]))
            offset += n
    assert offset == len(values)
    assert save_weights(model, tmp_path / "again.weights", header).read_bytes() == path.read_bytes()


def test_the_loaded_model_computes_what_darknets_layers_compute(tmp_path):
    model = small_yolov1()
    path = write_v1(tmp_path / "small.weights", random_values(model, seed=1))
    load_weights(model, path)
    reference = DarknetReference(yolov1_cfg(WIDTH, REPEATS, CLASSES, SIZE, GRID, BOXES, LOCAL), path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ours = model.raw_outputs(images)  # (N, S, S, 5B + C)
        (theirs,) = reference.forward(images)  # the [detection] layer's input, darknet's order
    assert theirs.shape == (2, GRID * GRID * (CLASSES + 5 * BOXES)) and theirs.abs().mean() > 0.1
    s, b, c = GRID, BOXES, CLASSES
    for row in range(s):  # darknet's detection layer: classes of all cells, confidences, then coords
        for col in range(s):
            i = row * s + col
            torch.testing.assert_close(ours[:, row, col, 5 * b:], theirs[:, i * c:(i + 1) * c], atol=1e-4, rtol=1e-4)
            for k in range(b):
                torch.testing.assert_close(ours[:, row, col, 5 * k + 4], theirs[:, s * s * c + i * b + k],
                                           atol=1e-4, rtol=1e-4)
                start = s * s * (c + b) + (i * b + k) * 4
                torch.testing.assert_close(ours[:, row, col, 5 * k:5 * k + 4], theirs[:, start:start + 4],
                                           atol=1e-4, rtol=1e-4)


def test_decoded_boxes_follow_darknets_detection_layer():
    model = small_yolov1().eval()
    s, b, c = GRID, BOXES, CLASSES
    flat = torch.zeros(1, s * s * (c + 5 * b))
    row, col = 1, 2
    i = row * s + col
    probs = torch.tensor([0.1, 0.7, 0.0, 0.2])
    conf = torch.tensor([0.9, 0.5, 0.3])
    # (x, y, √w, √h) per box, small and apart so that NMS keeps all; box 1 has a negative √h, which darknet squares
    coords = torch.tensor([[0.1, 0.2, 0.2, 0.3], [0.5, 0.8, 0.25, -0.2], [0.9, 0.4, 0.15, 0.1]])
    flat[0, i * c:(i + 1) * c] = probs
    flat[0, s * s * c + i * b:s * s * c + (i + 1) * b] = conf
    flat[0, s * s * (c + b) + i * b * 4:s * s * (c + b) + (i + 1) * b * 4] = coords.flatten()
    h, w = 300, 420
    (dets,) = model.postprocess(darknet_to_cells(flat, s, b, c), (h, w))
    expected = {}
    for k in range(b):  # get_detection_detections: centre (offset + col) / side · w, size value² · w
        x = (coords[k, 0] + col) / s * w
        y = (coords[k, 1] + row) / s * h
        bw, bh = coords[k, 2] ** 2 * w, coords[k, 3] ** 2 * h
        for j in range(c):
            if conf[k] * probs[j] > 0:
                expected[(k, j)] = (torch.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2]), conf[k] * probs[j])
    assert len(dets["boxes"]) == len(expected) == 9
    for box, score, label in zip(dets["boxes"], dets["scores"], dets["labels"]):
        k = int(torch.argmin(torch.stack([((coords[m, 0] + col) / s * w - (box[0] + box[2]) / 2).abs()
                                          for m in range(b)])))
        want_box, want_score = expected[(k, int(label))]
        torch.testing.assert_close(box, want_box, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(score, want_score, atol=1e-6, rtol=1e-5)


@pytest.fixture
def toy_batch_128():
    images = torch.full((2, 3, SIZE, SIZE), 0.5)
    images[0, :, 10:50, 20:60] = 1.0
    images[1, :, 60:120, 70:100] = 0.0
    targets = [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[70.0, 60.0, 100.0, 120.0]]), "labels": torch.tensor([2])}]
    return images, targets


def test_yolov1_darknet_trains_from_its_prior(toy_batch_128):
    images, targets = toy_batch_128
    model = small_yolov1(3, "model.dropout=0")
    with torch.no_grad():
        out = model.raw_outputs(images)  # a fresh head starts at the prior, in darknet's order too
    boxes = out[..., :5 * BOXES].reshape(2, GRID, GRID, BOXES, 5)
    assert torch.allclose(boxes[..., :2], torch.tensor(0.5), atol=0.1) and boxes[..., 4].abs().max() < 0.1
    assert (boxes[..., 1:, 2] > boxes[..., :-1, 2]).all()  # predictors at increasing sizes
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = model(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_noobj", "loss_cls"} and losses["loss_box"] > 0
    sum(losses.values()).backward()
    local = model.head[0]
    assert local.weight.grad.abs().sum() > 0 and local.bias.grad.abs().sum() > 0
    before = local.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, local.weight)
    model.eval()
    dets = model(images)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels"}


def test_a_file_of_another_class_count_or_a_fully_connected_yolov1_is_refused(tmp_path):
    model = small_yolov1()
    other = write_v1(tmp_path / "other.weights", random_values(small_yolov1(20)))
    with pytest.raises(ConvertError, match="left over"):
        load_weights(model, other)
    short = write_v1(tmp_path / "short.weights", random_values(model)[:-10])
    with pytest.raises(ConvertError, match=rf"ends inside connected layer {len(layout(model))} \(head\.4\)"):
        load_weights(model, short)
    for head, words in (("fc", "fully connected"), ("conv", "conv")):  # yolov1_cpu's head, the paper's FC head
        cfg = compose_config("train", ["model=yolov1_cpu", f"model.head={head}", "model.grid=7"])
        with pytest.raises(ConvertError, match=f"{words} head has no darknet cfg: model=yolov1_darknet"):
            layout(build_model(cfg.model, 3))
    assert isinstance(layout(model)[-1], LayerUnit)


def test_the_converter_tool_writes_a_voc_checkpoint(tmp_path):
    model = small_yolov1(len(VOC_CLASSES))
    path = write_v1(tmp_path / "small_voc.weights", random_values(model, seed=2))
    out = tmp_path / "small_voc.pt"
    subprocess.run([sys.executable, "tools/convert.py", "source=darknet", f"weights={path}", "model=yolov1_darknet",
                    f"out={out}", f"img_size={SIZE}", *SMALL], cwd=ROOT, check=True, capture_output=True,
                   env=CHECKOUT_ENV)
    detector = detkit.load(out)
    load_weights(model, path)
    assert detector.img_size == SIZE and detector.class_names == list(VOC_CLASSES)
    for a, b in zip(detector.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(m.eps == DARKNET_BN_EPS for m in detector.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stored = torch.load(out, weights_only=True)
    assert stored["converted_from"]["version"] == "0.1.0" and stored["config"]["model"]["head"] == "darknet"
    assert stored["config"]["data"]["resize"] == "stretch" and detector.letterbox.mode == "stretch"  # resize_image
