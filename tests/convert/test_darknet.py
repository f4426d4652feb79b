"""Darknet .weights into detkit (detkit/convert/darknet.py): the format exactly, every value consumed, clear
errors, and outputs equal to a network run with darknet's layer semantics (tests/convert/darknet_reference.py)."""

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import detkit
from detkit.app.build import build_model
from detkit.convert.coco import COCO80_IDS, COCO80_NAMES
from detkit.convert.darknet import (
    DARKNET_BN_EPS,
    ConvertError,
    darknet_parameter_count,
    layout,
    load_weights,
    read_weights,
    save_weights,
)
from tests.conftest import CHECKOUT_ENV, compose_config
from tests.convert.darknet_reference import DarknetReference, darknet_reorg, yolov3_cfg

ROOT = Path(__file__).resolve().parents[2]
# tools/ run as scripts import detkit from the path, not from the installed checkout: this one's
WIDTH, DEPTHS = 8, [1, 1, 2, 1, 1]
TINY = [f"model.backbone.width={WIDTH}", f"model.backbone.depths=[{','.join(map(str, DEPTHS))}]"]


def tiny_yolov3(num_classes: int = 3):
    return build_model(compose_config("train", ["model=yolov3", *TINY]).model, num_classes)


def write_darknet(path: Path, values: np.ndarray, major: int = 0, minor: int = 2, revision: int = 5,
                  seen: int = 12345) -> Path:
    """A .weights file written here from the format's definition, not with detkit's writer."""
    long_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    head = struct.pack("<3i", major, minor, revision) + struct.pack("<q" if long_seen else "<i", seen)
    path.write_bytes(head + values.astype("<f4").tobytes())
    return path


def random_values(model, seed: int = 0) -> np.ndarray:
    """As many values as the model's darknet file holds; running variances positive, as trained ones are."""
    rng = np.random.default_rng(seed)
    chunks = []
    for unit in layout(model):
        n = unit.conv.out_channels
        if unit.bn is not None:
            chunks += [rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 2, n)]
        else:
            chunks.append(rng.normal(0, 0.1, n))
        fan_in = unit.conv.weight[0].numel()
        chunks.append(rng.normal(0, (2.0 / fan_in) ** 0.5, unit.conv.weight.numel()))
    return np.concatenate(chunks).astype(np.float32)


def test_darknet_parameter_counts_of_the_models_that_follow_a_darknet_cfg():
    # conv weights + biases + BN gamma/beta at 80 classes, as darknet prints them for yolov3.cfg / yolov3-spp.cfg
    for name, count in (("yolov3", 61_949_149), ("yolov3_spp", 62_998_749)):
        assert darknet_parameter_count(build_model(compose_config("train", [f"model={name}"]).model, 80)) == count


@pytest.mark.parametrize("version", [(0, 2, 5), (0, 1, 0), (1, 0, 0)])
def test_a_file_written_from_known_values_loads_bit_exactly(tmp_path, version):
    # (0, 2): `seen` is int64; (0, 1), the YOLOv1/YOLOv2-era files: int32; (1, 0): major*10 >= 2, int64
    model = tiny_yolov3()
    values = random_values(model)
    path = write_darknet(tmp_path / "tiny.weights", values, *version, seen=2**31 + 7 if version != (0, 1, 0) else 77)
    header = load_weights(model, path)
    assert (header.major, header.minor, header.revision) == version
    assert header.seen == (77 if version == (0, 1, 0) else 2**31 + 7)
    offset = 0
    for unit in layout(model):
        if unit.bn is not None:
            order = [unit.bn.bias, unit.bn.weight, unit.bn.running_mean, unit.bn.running_var]
        else:
            order = [unit.conv.bias]
        for tensor in [*order, unit.conv.weight]:  # beta, gamma, mean, var (or bias), then the C-order kernel
            n = tensor.numel()
            assert torch.equal(tensor.detach().flatten(), torch.from_numpy(values[offset:offset + n]))
            offset += n
    assert offset == len(values)
    assert all(m.eps == DARKNET_BN_EPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # detkit's own writer gives the same bytes back
    again = save_weights(model, tmp_path / "again.weights", header)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("name", ["yolov3", "yolov3_spp"])
def test_the_loaded_model_computes_what_darknets_layers_compute(tmp_path, name):
    model = build_model(compose_config("train", [f"model={name}", *TINY]).model, 3)
    path = write_darknet(tmp_path / "tiny.weights", random_values(model, seed=1))
    load_weights(model, path)
    cfg = yolov3_cfg(WIDTH, DEPTHS, num_classes=3, spp=name == "yolov3_spp")
    reference = DarknetReference(cfg, path)  # reads every value itself
    model.eval()
    for size in (64, 96):
        images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ours = model.raw_outputs(images)  # per level (B, A, H, W, 5 + C), shallowest first
            theirs = reference.forward(images)[::-1]  # darknet's [yolo] layers come deepest first
        for a, b in zip(ours, theirs):
            batch, anchors, h, w, outputs = a.shape
            assert b.shape == (batch, anchors * outputs, h, w)
            torch.testing.assert_close(a.permute(0, 1, 4, 2, 3).reshape(b.shape), b, atol=1e-4, rtol=1e-4)


def test_darknets_reorg_is_not_pixel_unshuffle():
    x = torch.arange(2 * 8 * 4 * 4, dtype=torch.float32).view(2, 8, 4, 4)
    reorg = darknet_reorg(x, 2)
    assert reorg.shape == (2, 32, 2, 2) and sorted(reorg.flatten().tolist()) == sorted(x.flatten().tolist())
    assert not torch.equal(reorg, torch.nn.functional.pixel_unshuffle(x, 2))


def test_a_short_a_long_and_another_models_file_each_give_a_clear_error(tmp_path):
    model = tiny_yolov3()
    values = random_values(model)
    need = len(values)
    short = write_darknet(tmp_path / "short.weights", values[:-10])
    with pytest.raises(ConvertError, match=rf"{need - 10:,} floats .* needs {need:,} .* ends inside convolution "
                                           rf"{len(layout(model))} \(heads\.0\.1\)"):
        load_weights(model, short)
    long = write_darknet(tmp_path / "long.weights", np.concatenate([values, np.ones(5, np.float32)]))
    with pytest.raises(ConvertError, match=r"5 are left over"):
        load_weights(model, long)
    other = write_darknet(tmp_path / "other.weights", random_values(tiny_yolov3(num_classes=80)))
    with pytest.raises(ConvertError, match=r"left over.*another cfg or class count"):
        load_weights(model, other)
    before = [t.clone() for t in model.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))  # nothing copied
    (tmp_path / "stub.weights").write_bytes(b"\x00" * 7)
    with pytest.raises(ConvertError, match="7 bytes, shorter than a darknet header"):
        read_weights(tmp_path / "stub.weights")
    (tmp_path / "odd.weights").write_bytes(struct.pack("<3iq", 0, 2, 5, 0) + b"\x00" * 6)
    with pytest.raises(ConvertError, match="6 bytes after the 20-byte header are not whole float32"):
        read_weights(tmp_path / "odd.weights")
    sam = build_model(compose_config("train", ["model=yolov3", *TINY, "+model.sam=true"]).model, 3)
    with pytest.raises(ConvertError, match="no darknet cfg layout"):
        layout(sam)
    with pytest.raises(ConvertError, match="SSD has no darknet layout"):
        layout(build_model(compose_config("train", ["model=ssdlite"]).model, 3))


def coco_val(root: Path, count: int = 3) -> list[str]:
    """A COCO-format val set with COCO's 80 categories and real ids."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "img" / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": 128, "height": 96})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": COCO80_IDS[-1 - i],
                            "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0})
    categories = [{"id": cid, "name": name} for cid, name in zip(COCO80_IDS, COCO80_NAMES)]
    ann = root / "val.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return [f"data.val_json={ann}", f"data.val_images={root / 'img'}"]


def test_the_converter_tool_writes_a_checkpoint_every_tool_loads(tmp_path):
    model = tiny_yolov3(num_classes=80)
    path = write_darknet(tmp_path / "tiny80.weights", random_values(model, seed=2))
    out = tmp_path / "tiny80.pt"
    subprocess.run([sys.executable, "tools/convert.py", "source=darknet", f"weights={path}", "model=yolov3",
                    f"out={out}", "img_size=96", *TINY], cwd=ROOT, check=True, capture_output=True, env=CHECKOUT_ENV)
    detector = detkit.load(out)
    load_weights(model, path)
    assert detector.img_size == 96 and detector.class_names == list(COCO80_NAMES)
    for a, b in zip(detector.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(m.eps == DARKNET_BN_EPS for m in detector.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    stored = torch.load(out, weights_only=True)
    assert stored["converted_from"]["format"] == "darknet" and stored["config"]["model"]["bn_eps"] == 1e-5
    assert detector.letterbox.fill == stored["config"]["data"]["pad_value"] == 127.5  # darknet's letterbox grey 0.5
    # evaluated on COCO-format data, its predictions carry COCO's own category ids (1-90 with gaps)
    cfg = OmegaConf.to_container(compose_config("train", ["data=coco", *coco_val(tmp_path / "coco"),
                                                          "data.train_json=null", "data.train_images=null"]).data,
                                 resolve=True)
    detector.evaluate(data=cfg, out_dir=tmp_path / "eval")
    ids = {p["category_id"] for p in json.loads((tmp_path / "eval" / "predictions.json").read_text())}
    assert ids and ids <= set(COCO80_IDS) and max(ids) > 80
    bad = subprocess.run([sys.executable, "tools/convert.py", "source=darknet", f"weights={path}", "model=yolov3",
                          f"out={tmp_path / 'bad.pt'}", "img_size=96"], cwd=ROOT, capture_output=True, text=True,
                         env=CHECKOUT_ENV)
    assert bad.returncode != 0 and "floats after its 20-byte header" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.pt").exists()


def test_fine_tuning_a_converted_checkpoint_on_other_classes_keeps_all_but_the_class_outputs(
        tmp_path, tiny_overrides):
    from detkit.app.train import train

    model = tiny_yolov3(num_classes=80)
    path = write_darknet(tmp_path / "tiny80.weights", random_values(model, seed=3))
    from detkit.convert.checkpoint import convert_darknet

    convert_darknet(path, tmp_path / "tiny80.pt", "yolov3", 96, TINY)
    load_weights(model, path)
    data = [o for o in tiny_overrides if not o.startswith("model.")]
    cfg = compose_config("train", [*data, "model=yolov3", *TINY, f"weights={tmp_path / 'tiny80.pt'}",
                                   "trainer.epochs=1", "optim.lr=1e-9", "trainer.ema.enabled=false",
                                   "eval.plots=false", "auto.priors=false", "data.mosaic.prob=0"])
    train(cfg, tmp_path / "run")
    tuned = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    classes = len(tuned["class_names"])
    assert classes != 80 and tuned["config"]["model"]["bn_eps"] == DARKNET_BN_EPS
    before, after = model.state_dict(), tuned["model"]
    for key, value in after.items():
        if re.fullmatch(r"heads\.\d\.1\.(weight|bias)", key):  # the output convs
            old = before[key].view(3, 85, *before[key].shape[1:])
            new = value.view(3, 5 + classes, *value.shape[1:])
            torch.testing.assert_close(new[:, :5], old[:, :5], atol=1e-6, rtol=1e-4)  # box and objectness kept
        elif value.dtype.is_floating_point and "running" not in key:
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-4)  # lr 1e-9: unchanged
