"""tools/compare_compression.py's table on a tiny checkpoint: every method, the baseline and a backbone swap."""

import json

import pytest
import torch

from detkit.app.evaluate import load_trained
from detkit.compression.compare import compare_compression, format_table, retime_comparison, swap_config
from detkit.compression.methods import METHODS
from detkit.compression.slim import measure_latencies
from tests.compression.detector_fixtures import one_thread  # noqa: F401
from tests.compression.method_fixtures import tiny_checkpoint as checkpoint_fixture
from tests.conftest import compose_config

tiny_checkpoint = checkpoint_fixture


def test_compare_writes_a_row_per_method_plus_baseline_and_swap_all_timed(tiny_checkpoint, tmp_path):
    cfg = compose_config("compare_compression", [
        f"checkpoint={tiny_checkpoint}", "finetune.epochs=0", "swap.model=yolov3_mobilenetv2_cpu", "swap.epochs=1",
        "int8.calibration_batches=1", "prune.calibration_batches=1", "latency.repeats=2", "latency.rounds=2",
        "latency.threads=1", "latency.compile_int8=false"])
    result = compare_compression(tiny_checkpoint, tmp_path, cfg)
    rows = result["rows"]
    assert list(rows) == ["baseline", *METHODS, "swap: yolov3_mobilenetv2_cpu"]
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "the base checkpoint" in table
    assert json.loads((tmp_path / "table.json").read_text())["rows"].keys() == rows.keys()
    assert all(r["latency_ms"] > 0 and r["AP"] is not None and r["gflops"] > 0 for r in rows.values())
    base = rows["baseline"]
    assert rows["magnitude"]["nonzero_params"] < 0.7 * rows["magnitude"]["params"] == 0.7 * base["params"]
    assert rows["slim"]["params"] < base["params"] and rows["lowrank"]["params"] < base["params"]
    assert rows["deep_compression"]["weights_mb"] < 0.5 * base["weights_mb"]
    swap = load_trained(result["runs"]["swap"]["artifact"])[1]
    assert swap.model.backbone._target_.endswith("MobileNetV2") and swap.trainer.epochs == 1
    assert swap.data.img_size == load_trained(tiny_checkpoint)[1].data.img_size  # the base run's data
    # retime: the same rows and accuracy, latencies measured again from the reloaded artifacts
    (tmp_path / "table.md").unlink()
    again = retime_comparison(tmp_path, {"repeats": 1, "rounds": 1, "threads": 1, "compile_int8": False})["rows"]
    assert again.keys() == rows.keys() and (tmp_path / "table.md").is_file()
    assert all(again[k]["AP"] == rows[k]["AP"] and again[k]["latency_ms"] > 0 for k in rows)
    assert "1 interleaved rounds" in (tmp_path / "table.md").read_text()


def test_swap_config_and_table_details():
    base = compose_config("train", ["trainer.epochs=7", "+compress=sparsity"])
    cfg = swap_config(base, "yolov3_mobilenetv2", 3, ["model.backbone.width=0.5"])
    assert cfg.model.backbone.width == 0.5 and cfg.trainer.epochs == 3 and cfg.sparsity is None
    row = {"params": 2e6, "gflops": 1.0, "weights_mb": 8.0, "latency_ms": 10.0, "AP": 0.4, "AP50": 0.8}
    table = format_table({"baseline": row, "half": {**row, "params": 1e6, "latency_ms": 5.0, "AP": None}})
    assert "| half | 1.000M |" in table and "| 2.00x | 1.00x | 1.00x | 2.00x |" in table and "| – |" in table
    with pytest.raises(ValueError, match="unknown method"):
        compare_compression("unused.pt", "unused", {"methods": ["slim", "prune"]})


def test_latencies_are_measured_in_interleaved_rounds():
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, images):
            calls.append(self.name)
            return images

    latencies = measure_latencies({"a": Recorder("a"), "b": Recorder("b")}, 8, repeats=1, rounds=2)
    assert set(latencies) == {"a", "b"} and all(v > 0 for v in latencies.values())
    assert calls == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4  # 3 warm-up + 1 timed, per model, per round
